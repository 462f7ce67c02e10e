"""The parts of ``tools/benchmark.py`` (the command line), one concern a module:

- ``registry``: what is measured: ``BUNDLES`` (the bundles, their sizes and baselines), ``BASELINES`` (how each
  baseline is built), :class:`~bench.registry.Entry` and ``resolve_entry`` (one bundle's networks and sizes);
- ``timing``: how it is timed: autocast, CUDA synchronisation, forward latency, whole-volume runs and their inferer;
- ``memory``: how memory is read: CPU resident-set growth in a fresh process (``--memory-worker``), CUDA peak;
- ``measure``: the comparison table (the default mode): every figure of every model, side by side;
- ``sweep``: ``--sweep``, a bundle's whole-volume inference under other settings;
- ``profile``: ``--profile``, one forward's time by kind of layer and by operator;
- ``cases``: ``--cases``, issue 16's table: machine peaks, cost per patch, whole cases through the bundles, goals;
- ``case_data``: the synthetic BraTS-like case of ``--cases`` (a skull-stripped brain in a 240 x 240 x 155 field);
- ``peaks``: the machine's fp32 matmul and dense Conv3d GFLOP/s;
- ``runtimes``: ``--runtimes``, eager PyTorch / torch.compile / ONNX Runtime / OpenVINO on one network;
- ``report``: machine information, the Markdown and JSON reports, the ratios and the cost plot;
- ``common``: the repository root, the progress log and short error messages.

``tools/`` must be on ``sys.path`` (``tools/benchmark.py`` puts it there).
"""
