"""Sizing against the live cluster: the session's local Ray, one node without a GPU."""

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
    assert "holds 0 of the 1" in runtime.cluster_shortfall(num_workers=1, cpus_per_worker=1, use_gpu=True)
