"""Run folders: the typed result.json (`result`: `RunResult`), stable run ids, atomic writes,
artefact checks (`store`)."""

from idlab.runs.result import *  # noqa: F403
from idlab.runs.result import __all__ as _result_all
from idlab.runs.store import *  # noqa: F403
from idlab.runs.store import __all__ as _store_all

__all__ = [*_result_all, *_store_all]
