"""Sweeps: the grid of a study (`grid`), running one run (`execute`), the executors
(`executors`), the memory plan (`plan`) and the driver (`driver`)."""
