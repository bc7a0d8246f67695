"""Sizing against the live cluster: the session's local Ray, one node without a GPU."""

import os

import ray

from distributed import runtime


def local_cpus():
    return int(ray.cluster_resources()["CPU"])  # 3, or the machine's cores where it has more


def test_workers_that_fit_count_whole_workers_per_node(ray_session):
    cpus = local_cpus()
    assert runtime.workers_that_fit(cpus_per_worker=1) == cpus
    assert runtime.workers_that_fit(cpus_per_worker=2) == cpus // 2  # a spare CPU holds no worker
    assert runtime.workers_that_fit(cpus_per_worker=cpus + 1) == 0
    assert runtime.workers_that_fit(cpus_per_worker=1, gpus_per_worker=1) == 0


def test_cluster_shortfall_names_what_is_missing(ray_session):
    cpus = local_cpus()
    assert runtime.cluster_shortfall(num_workers=cpus, cpus_per_worker=1, use_gpu=False) is None
    warning = runtime.cluster_shortfall(num_workers=cpus // 2 + 1, cpus_per_worker=2, use_gpu=False)
    assert f"holds {cpus // 2} of the {cpus // 2 + 1} training workers" in warning and "2 CPUs each" in warning
    assert "--cpus-per-worker" in warning
    warning = runtime.cluster_shortfall(num_workers=1, cpus_per_worker=1, use_gpu=True)
    assert "holds 0 of the 1" in warning and "Ray Train will wait" in warning and "drop --use-gpu" in warning


def test_connecting_again_leaks_no_ray_setup_hook_into_subprocesses(ray_session):
    # The local Ray's setup hook lives in its own GCS; another cluster's workers that inherited
    # its key (through os.environ, e.g. a `ray start` head) die looking for it.
    runtime.connect()
    assert [key for key in os.environ if "SETUP_HOOK" in key] == []
    # ray.init writes the hook's key into the env_vars it is handed: a copy, never WORKER_ENV.
    assert set(runtime.WORKER_ENV) == {"TF_USE_LEGACY_KERAS", "TF_CPP_MIN_LOG_LEVEL"}
