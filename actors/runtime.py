"""Runtime settings shared by the actors."""

SINGLE_THREAD_ENV = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
"""One BLAS / OpenMP thread per actor, set through the runtime env because BLAS reads it once,
when numpy loads, before any actor code runs. More threads than an actor's CPU share
oversubscribe the node: four torch actors on 2 cores ran 14-19x slower with more threads,
and the rewards benchmark was fastest single-threaded."""
