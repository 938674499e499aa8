"""Pictures that teach: schedule curves, data turning into noise, trajectories, sample grids; each
dispatching on the kind of data (images (N, C, H, W), signals (N, C, L), vectors (N, D)).

* ``figures.py``: matplotlib (lazily, Agg), ``save_figure`` (the one figure writer), per-item panels.
* ``images.py``: ``save_samples`` (samples as a picture, by kind), ``save_image_grid``, scatter and line plots.
* ``plots.py``: schedules, the forward process, the closest sample / training pairs.
* ``trajectories.py``: one sampling run step by step, samplers side by side (through ``generate``).
* ``guidance.py``: the same seeds at increasing guidance scale, one row per scale (through ``generate``).

Each figure function returns the numbers it drew (so tests can check the data, not only the file) and
writes the picture atomically: grids as .png or .jpg, plots also as .svg (``io.files.IMAGE_SUFFIXES``,
``PLOT_SUFFIXES``); another suffix is a ValueError naming the allowed ones.
"""
from .figures import _plt as _plt, check_picture, kind_of, save_figure
from .guidance import guidance_samples, plot_guidance
from .images import (group_rows, plot_points, plot_signals, sample_suffixes, save_image_grid, save_samples, tile_grid,
                     tile_rows)
from .plots import default_schedules, plot_forward_2d, plot_forward_strip, plot_nearest_pairs, plot_schedules
from .trajectories import plot_sampler_grid, plot_trajectory, record_trajectory, sampler_grid

__all__ = ["check_picture", "kind_of", "save_figure", "plot_points", "plot_signals", "save_image_grid",
           "save_samples", "sample_suffixes", "tile_grid", "tile_rows", "group_rows", "guidance_samples",
           "plot_guidance", "default_schedules", "plot_forward_2d", "plot_forward_strip", "plot_nearest_pairs",
           "plot_schedules", "plot_sampler_grid", "plot_trajectory", "record_trajectory", "sampler_grid"]
