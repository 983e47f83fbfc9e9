"""Code the tests share; not part of the installed ``san_det`` package.

- :mod:`.paths`: the repository root and its config files.
- :mod:`.skips`: ``needs_cxx``, ``needs_cuda``, ``needs_nvrtc``.
- :mod:`.launch`: ``launch_config``, tiny launch grids and odd CPU tiles for the kernel tests.
- :mod:`.nvrtc`: a kernel file compiled for a GPU architecture without a GPU, with the options
  CuPy uses at run time; ptxas's registers per kernel.
- :mod:`.kernel_variants`: the compiled CPU variants (instruction-set levels, tiles) the kernel
  tests cover.
- :mod:`.scripts`: ``train_net.py`` / tools as modules, the environment of child processes, log
  handlers left on closed streams.
- :mod:`.processes`: whether a process runs, polling until something holds.
- :mod:`.coco_files`: small COCO-format sets in a folder (optionally broken images).
- :mod:`.tiny_detection`: a tiny RetinaNet and :class:`~.tiny_detection.TinyTestNet`, their configs.
- :mod:`.synthetic_coco`: a generated COCO ground truth with detector-like results (also used by
  ``benchmarks/bench_coco_eval.py``).
- :mod:`.classification`: tiny classification configs.
"""
