"""Speed and scale, measured: ``make bench`` (``python -m convcg_cli.bench run [--quick] [OVERRIDES]``).

Every figure comes from one command on the machine at hand and goes to ``reports/bench/bench.md``
and to an MLflow run (experiment ``convcg-bench``; the report and the raw figures as artifacts).
Settings live in ``conf/bench.yaml``; the model, data and trainer under test are ``conf/train.yaml``'s.

Each step runs in its own subprocess, so the peak resident memory (``VmHWM``) it reports is its own.
Figures that are compared with each other are measured in *one* process, interleaved round by round,
because a shared machine's speed drifts: Lightning vs a bare loop, the data path vs the model,
exact top-k vs the bare GEMM of its shapes vs torch vs an ANN index.

Steps:
    baseline   peak memory of the imports alone (the floor the memory figures are measured above)
    synth      generate (or reuse) the synthetic logs of the preset
    data       datamodule setup; batches/s of the training data path alone
    train      ``trainer.fit`` (convcg train's trainer, logger included) vs a bare PyTorch loop over
               the same model, optimizer, clipping and batches; the data path again, for its ratio
               to model consumption; saves embeddings for ``retrieval``
    retrieval  exact top-k (``exact_topk``) vs the faiss path it replaced vs torch matmul + topk vs
               the bare GEMM of its shapes vs an ANN index (config)
    serve      the served model (``serving``): pyfunc predict latency p50/p99, batch ``retrieve``
               throughput vs the bare ``exact_topk`` path, index build times
    corpus     (j) at each corpus size up to 1M items: exact search and every ANN index of
               ``corpus.ann`` (build, bytes, throughput, latency, overlap), and how each cost grows
    scale      synthesis, setup, a training step and exact top-k at several sizes; log-log slopes
    memory     peak memory of a training process, streamed vs in memory, as the log grows

Modules: ``measure`` (pure measuring helpers), ``training`` (the training pieces the steps share:
config, datamodule and model, the bare loop, the first-step measure), ``serving`` (the served model's
step), ``corpus`` (exact vs ANN search as the corpus grows), ``grid`` (a grid's time per phase),
``flops`` (FLOPs and the bare GEMM), ``steps`` (the measured steps, one per subprocess), ``runner``
(runs them in order), ``figures`` (headline metrics and growth exponents from the raw results),
``report`` and ``report_commands`` (the markdown report), ``cli`` (the Typer app). The indexes
searched (exact, IVF, HNSW, IVF over codes) are :mod:`convcg_cli.index`'s.

Imports point one way: ``cli`` -> ``runner`` / ``steps`` / ``report``; ``steps`` -> ``serving`` /
``corpus`` / ``grid`` -> ``training`` -> ``measure``.
"""
