"""The Ray backend of sweeps: every (trial, fold) is a Ray Tune trial, anywhere on a Ray cluster.

A sweep YAML selects it with::

    backend: ray
    workers: 8                 # at most this many trials at once (0: as many as the cluster fits)
    ray:
      address: auto            # an existing cluster (``ray start`` / Slurm); omit for a local one
      cpus_per_trial: 2
      gpus_per_trial: 0

Each Tune trial runs exactly what the local backend runs (:func:`run_one`:
``python -m melanoma_tf.train --run-dir`` then the validation scoring, as
child processes), so results, resumability and folders are the same: a
finished (trial, fold) is skipped, a killed one continues from its last epoch.
Every node needs the package installed and the same paths (a shared file
system for ``output`` and ``data.root``), as on a Slurm cluster.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from melanoma_tf.config import ConfigError
from melanoma_tf.errors import TrialError

log = logging.getLogger("melanoma_tf.sweep")


def run_with_ray(spec, jobs: list[tuple[dict, int]], root: Path,
                 run_job: Callable[[dict, int], list[dict]]) -> list[list[dict]]:
    """Runs the jobs as Ray Tune trials; returns each job's rows, in the order of ``jobs``.

    Args:
      spec: the sweep (its ``ray`` settings, ``workers`` and ``name``).
      jobs: (trial, fold) pairs.
      root: the sweep folder (Ray's results go to ``root/ray_results``).
      run_job: runs one (trial, fold) and returns its rows (the sweep's own runner, passed in so
        this module does not import the sweep).
    """
    try:
        import ray
        from ray import tune
    except ImportError:  # pragma: no cover - depends on the installation
        raise ConfigError("backend: ray needs Ray Tune: pip install 'melanoma_tf[ray]'") from None
    settings = spec.ray
    address = settings.get("address")
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
        if address:
            kwargs["address"] = address
        else:  # a local cluster on this machine
            kwargs["num_cpus"] = max(spec.workers, 1) * int(settings.get("cpus_per_trial", 1))
        ray.init(**kwargs)
    log.info("Ray cluster: %s", ray.cluster_resources())

    def trainable(config: dict) -> None:
        trial, fold = jobs[config["job"]]
        rows = run_job(trial, fold)
        node = ray.get_runtime_context().get_node_id()
        tune.report({"rows": [dict(row, node=node) for row in rows], "done": True})

    resources = {"cpu": float(settings.get("cpus_per_trial", 1)), "gpu": float(settings.get("gpus_per_trial", 0))}
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space={"job": tune.grid_search(list(range(len(jobs))))},
        tune_config=tune.TuneConfig(max_concurrent_trials=spec.workers or None),
        run_config=tune.RunConfig(name=spec.name, storage_path=str(root / "ray_results"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1)))
    try:
        results = tuner.fit()
        by_job: dict[int, list[dict]] = {}
        for result in results:
            if result.error is not None:
                raise TrialError(f"a Ray trial failed: {result.error}")
            by_job[int(result.config["job"])] = result.metrics["rows"]
    finally:
        if started_here:
            ray.shutdown()
    return [by_job[i] for i in range(len(jobs))]
