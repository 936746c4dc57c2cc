"""tf.distribute: MirroredStrategy over two logical CPU devices gives the single-device update; train runs on it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, tiny_overrides

ENV = {**os.environ, "MELANOMA_TF_CPU_DEVICES": "2", "TF_CPP_MIN_LOG_LEVEL": "3"}

SAME_UPDATE = r"""
import json, numpy as np
from melanoma_tf.backend import keras, make_strategy, tf
from melanoma_tf import losses
from melanoma_tf.distill.kd import Distiller

def step(strategy_name):
    strategy = make_strategy(strategy_name)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inp = keras.Input((4,))
        student = keras.Model(inp, keras.layers.Dense(1)(inp))
        inp_t = keras.Input((4,))
        teacher = keras.Model(inp_t, keras.layers.Dense(1)(inp_t))
        trainer = Distiller(student, losses.bce, teacher=teacher, alpha=0.5, temperature=2.0)
        trainer.compile(optimizer=keras.optimizers.SGD(0.5))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.integers(0, 2, (8, 1)).astype("float32")
    trainer.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    return strategy.num_replicas_in_sync, [w.tolist() for w in student.get_weights()]

print(json.dumps({"none": step("none"), "mirrored": step("mirrored")}))
"""


def test_mirrored_update_equals_single_device():
    result = subprocess.run([sys.executable, "-c", SAME_UPDATE], env=ENV, capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    (one, single), (two, mirrored) = out["none"], out["mirrored"]
    assert (one, two) == (1, 2)
    import numpy as np

    for a, b in zip(single, mirrored):
        np.testing.assert_allclose(a, b, atol=1e-5)  # without loss scaling the step would be twice as big


@pytest.mark.slow
def test_train_with_mirrored_strategy(synthetic_root, tmp_path):
    overrides = tiny_overrides(synthetic_root, tmp_path, **{"train.distribution": "mirrored", "train.epochs": 1})
    args = [sys.executable, "-m", "melanoma_tf.train", "--config", str(REPO / "configs" / "student_mobilenetv3.yaml")]
    for item in overrides:
        args += ["--set", item]
    result = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training on 2 replicas (MirroredStrategy)" in result.stderr
    run_dir = result.stdout.strip().splitlines()[-1][len("run: "):]
    metrics = json.loads(open(os.path.join(run_dir, "metrics.json")).read())
    assert 0 <= metrics["val_roc_auc"] <= 1 and metrics["epochs_run"] == 1


MULTI_WORKER_STEP = r"""
import json, sys, numpy as np
from melanoma_tf.backend import keras, make_strategy, tf
from melanoma_tf import losses
from melanoma_tf.distill.kd import Distiller

strategy = make_strategy(sys.argv[1])
with strategy.scope():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    student = keras.Model(inp, keras.layers.Dense(1)(inp))
    trainer = Distiller(student, losses.bce)
    trainer.compile(optimizer=keras.optimizers.SGD(0.5))
rng = np.random.default_rng(1)
x = rng.normal(size=(8, 4)).astype("float32")
y = rng.integers(0, 2, (8, 1)).astype("float32")
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).with_options(options)
trainer.fit(data, epochs=1, verbose=0)
print("RESULT " + json.dumps([strategy.num_replicas_in_sync, [w.tolist() for w in student.get_weights()]]))
"""


def _free_ports(n):
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_strategy_across_two_processes():
    """Two worker processes (TF_CONFIG on localhost) take one synchronous step: the single-device update."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    env = {k: v for k, v in ENV.items() if k != "MELANOMA_TF_CPU_DEVICES"}
    workers = [subprocess.Popen([sys.executable, "-c", MULTI_WORKER_STEP, "multi_worker"], cwd=REPO,
                                env={**env, "TF_CONFIG": json.dumps({"cluster": cluster,
                                                                     "task": {"type": "worker", "index": i}})},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    for w, (out, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]
    results = [json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
               for out, _ in outputs]
    single = subprocess.run([sys.executable, "-c", MULTI_WORKER_STEP, "none"], cwd=REPO, env=env,
                            capture_output=True, text=True, check=True).stdout
    reference = json.loads(next(line for line in single.splitlines() if line.startswith("RESULT "))[7:])
    assert [r[0] for r in results] == [2, 2]  # one replica per worker
    for replicas, weights in results:
        for got, want in zip(weights, reference[1]):
            # each worker takes its shard of the batch; the all-reduced step is the single-device one
            assert np.allclose(got, want, atol=1e-6), (got, want)
