#!/usr/bin/env python3
"""Training throughput: teacher, student, and distillation with an online vs a cached teacher.

    python tools/benchmark_training.py [--size 128] [--batch 32] [--steps 20] [--json OUT]

Each job trains through the real Distiller: all jobs are built and warmed up
(two batches: tracing) first, then timed ``--repeats`` times over ``--steps``
batches in turn (student, cached, ... then again), so a slow moment of the
machine does not land on one job only; the median images/second per job and
the ratio of a distillation step to a student-only step are printed. Peak RSS
is the process's high-water mark after each job's warm-up. Target (issue 6): distillation with cached teacher
logits costs <= 1.25x a student-only epoch.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", default="teacher,student,distill online teacher,distill cached logits",
                        help="comma-separated subset of the jobs")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    from melanoma_tf import config as C
    from melanoma_tf import losses, models
    from melanoma_tf.backend import keras, tf
    from melanoma_tf.distill.kd import Distiller

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    n = args.batch * (args.steps + 2)
    images = rng.uniform(0, 255, (n, args.size, args.size, 3)).astype(np.float32)
    labels = rng.integers(0, 2, (n, 1)).astype(np.float32)
    teacher = models.build_teacher(C.TeacherConfig(), args.size)
    cached_logits = rng.normal(size=(n, 1)).astype(np.float32)

    def dataset(with_logits: bool):
        inputs = {"image": images, "teacher_logits": cached_logits} if with_logits else images
        return tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(args.batch).cache().prefetch(2)

    jobs = {
        "teacher": lambda: (Distiller(models.build_teacher(C.TeacherConfig(), args.size), losses.bce), False),
        "student": lambda: (Distiller(models.build_student(C.StudentConfig(), args.size), losses.bce), False),
        "distill online teacher": lambda: (Distiller(models.build_student(C.StudentConfig(), args.size), losses.bce,
                                                     teacher=teacher, alpha=0.5, temperature=2.0), False),
        "distill cached logits": lambda: (Distiller(models.build_student(C.StudentConfig(), args.size), losses.bce,
                                                    alpha=0.5, temperature=2.0), True),
    }
    chosen = [j.strip() for j in args.jobs.split(",") if j.strip()]
    unknown = set(chosen) - set(jobs)
    if unknown:
        parser.error(f"--jobs: unknown {sorted(unknown)}; choose from {list(jobs)}")
    prepared, results = {}, {}
    for name in chosen:
        trainer, with_logits = jobs[name]()
        trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
        ds = dataset(with_logits)
        trainer.fit(ds.take(2), epochs=1, verbose=0)
        prepared[name] = (trainer, ds.skip(2))
        results[name] = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, "seconds": []}
    for _ in range(args.repeats):
        for name, (trainer, timed) in prepared.items():
            start = time.perf_counter()
            trainer.fit(timed, epochs=1, verbose=0)
            results[name]["seconds"].append(time.perf_counter() - start)
    for name, r in results.items():
        r["images_per_second"] = args.batch * args.steps / float(np.median(r["seconds"]))
        print(f"{name:24s} {r['images_per_second']:8.1f} images/s (median of {args.repeats})   "
              f"peak RSS {r['peak_rss_mb']:8.0f} MB", flush=True)
    if "student" not in results:
        return 0
    student = results["student"]["images_per_second"]
    for name in [n for n in ("distill online teacher", "distill cached logits") if n in results]:
        ratio = student / results[name]["images_per_second"]
        results[name]["cost_vs_student"] = ratio
        print(f"{name}: {ratio:.2f}x the time of a student-only step" +
              (" (target <= 1.25x)" if "cached" in name else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "batch": args.batch, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
