"""Li et al.'s networks have the paper's exact parameter counts."""

from idlab.models import lenet, mnist_fc, num_parameters


def test_parameter_counts_match_li_et_al_table_1() -> None:
    assert num_parameters(mnist_fc()) == 199_210
    assert num_parameters(lenet()) == 44_426
    assert num_parameters(lenet(in_channels=3, image_size=32)) == 62_006
