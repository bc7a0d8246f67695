"""Sizing against the live cluster: the session's local Ray, one node without a GPU."""

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
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
    memory = ray.nodes()[0]["Resources"]["memory"]  # what Ray gives tasks of the node's memory
    assert runtime.workers_that_fit(cpus_per_worker=1, memory_per_worker=memory // 2) == min(cpus, 2)
    assert runtime.workers_that_fit(cpus_per_worker=1, memory_per_worker=memory + 1) == 0


def test_workers_that_fit_leave_out_the_nodes_that_died(ray_session, monkeypatch):
    # ray.nodes() keeps a node that died (a preempted spot instance) with its resources: counted, auto would
    # start actors that never get one, and a shortfall would go unnamed.
    live = ray.nodes()
    dead = {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0, "memory": float(2**40)}}
    monkeypatch.setattr(ray, "nodes", lambda: [*live, dead])
    assert runtime.workers_that_fit(cpus_per_worker=1) == local_cpus()
    assert runtime.workers_that_fit(cpus_per_worker=1, gpus_per_worker=1) == 0


def env_for_a_ray_of_its_own():
    """This environment but RAY_ADDRESS: runtime.connect in a process given it starts a local Ray."""
    return {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}


def run_with_a_ray_of_its_own(lines):
    """Run the Python `lines` in a process, and session, of their own, where runtime.connect starts a local Ray."""
    return subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, timeout=300,
                          env=env_for_a_ray_of_its_own(), start_new_session=True)


def test_a_local_ray_gets_the_cpus_asked_for_and_runs_outside_the_drivers_process_group():
    # Ray Data's tasks run beside workers or actors that hold every core only if the local Ray has CPUs to spare.
    # And a SIGTERM to the job's process group (`timeout`) must reach the driver alone: had it
    # ended the local Ray's GCS and raylet too, Ray's core would at times end the driver with status 1 first.
    # A process of its own: this one's Ray is the session's.
    lines = [
        "import os, subprocess, ray",
        "from distributed import runtime",
        "runtime.connect(num_cpus=os.cpu_count() + 2)",
        "print('extra CPUs:', int(ray.cluster_resources()['CPU']) - os.cpu_count())",
        "children = subprocess.run(['ps', '-o', 'pgid=,comm=', '--ppid', str(os.getpid())], capture_output=True, "
        "text=True).stdout.split()",
        "daemons = [int(group) for group, name in zip(children[::2], children[1::2])",
        "           if name in ('gcs_server', 'raylet')]",
        "print('daemons:', len(daemons), 'in its group:', daemons.count(os.getpgrp()))",
    ]
    run = run_with_a_ray_of_its_own(lines)
    assert "extra CPUs: 2" in run.stdout, run.stderr[-2000:]
    assert "daemons: 2 in its group: 0" in run.stdout, run.stdout + run.stderr[-2000:]


def processes_holding_files_in(directory):
    """Pids of the live processes with a file open below `directory` (a Ray session's logs, say)."""
    holding = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if any(link.startswith(f"{directory}/") for link in links):
            holding.add(int(pid))
    return holding


def test_a_second_ctrl_c_as_the_job_exits_leaves_no_ray_process_behind():
    # Pressed again as the job exited, Ctrl-C cut Ray's shutdown short: "Exception ignored in atexit callback",
    # and the local Ray's dashboard and runtime-env agents lived on, orphans that ignore SIGTERM.
    lines = [
        "import os, signal, sys, time, ray",
        "from distributed import runtime",
        "runtime.connect(num_cpus=1)",
        "node = ray._private.worker._global_node",
        "print(node.get_session_dir_path(), flush=True)",
        "kill_all_processes = node.kill_all_processes",
        "def interrupted_first(*args, **kwargs):  # Ray's shutdown at exit, as it begins",
        "    os.kill(os.getpid(), signal.SIGINT)",
        "    time.sleep(0.2)",
        "    return kill_all_processes(*args, **kwargs)",
        "node.kill_all_processes = interrupted_first",
        "sys.exit(130)",
    ]
    run = run_with_a_ray_of_its_own(lines)
    session = run.stdout.strip()
    assert run.returncode == 130 and session.startswith("/"), run.stderr[-2000:]
    assert "Exception ignored" not in run.stderr, run.stderr[-2000:]
    for _ in range(50):  # the agents take a moment to go
        left = processes_holding_files_in(session)
        if not left:
            break
        time.sleep(0.2)
    assert not left, subprocess.run(["ps", "-o", "pid,ppid,args", "-p", ",".join(map(str, left))],
                                    capture_output=True, text=True).stdout


def test_cluster_shortfall_names_what_is_missing(ray_session, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "started_local_ray", False)  # as if joined through RAY_ADDRESS
    cpus = local_cpus()
    assert runtime.cluster_shortfall(num_workers=cpus, cpus_per_worker=1, use_gpu=False) is None
    warning = runtime.cluster_shortfall(num_workers=cpus // 2 + 1, cpus_per_worker=2, use_gpu=False)
    assert f"holds {cpus // 2} of the {cpus // 2 + 1} training workers" in warning and "2 CPUs each" in warning
    assert "--cpus-per-worker" in warning
    warning = runtime.cluster_shortfall(num_workers=1, cpus_per_worker=1, use_gpu=True)
    assert "holds 0 of the 1" in warning and "Ray Train will wait" in warning and "drop --use-gpu" in warning
    runtime.refuse_or_warn(warning)  # an autoscaler may still add a GPU node: the run goes on
    assert capsys.readouterr().err == f"[unet-ray] warning: {warning}\n"
    runtime.refuse_or_warn(None)
    assert capsys.readouterr().err == ""


def test_a_shortfall_on_the_local_ray_a_job_started_is_refused_not_waited_for(ray_session, tmp_path):
    # No node can ever join it: Ray Train would wait forever (WorkerGroupStartupTimeoutError each minute).
    from distributed.config import TrainConfig
    from distributed.training import train

    assert runtime.started_local_ray  # the session's Ray came from runtime.connect, as a job's does
    with pytest.raises(ValueError, match="the local Ray this job started holds 0 of the 1 training workers asked "
                                         "for \\(2 CPUs \\+ 1 GPU each\\), and no node can join it: lower "
                                         "--num-workers or --cpus-per-worker, or drop --use-gpu"):
        train(TrainConfig(output=str(tmp_path / "run"), use_gpu=True).smoke())
    assert not (tmp_path / "run" / "ray_results").exists()  # refused before any training


def test_connecting_again_leaks_no_ray_setup_hook_into_subprocesses(ray_session):
    # The local Ray's setup hook lives in its own GCS; another cluster's workers that inherited
    # its key (through os.environ, e.g. a `ray start` head) die looking for it.
    runtime.connect()
    assert [key for key in os.environ if "SETUP_HOOK" in key] == []
    # ray.init writes the hook's key into the env_vars it is handed: a copy, never WORKER_ENV.
    assert set(runtime.WORKER_ENV) == {"TF_USE_LEGACY_KERAS", "TF_CPP_MIN_LOG_LEVEL"}


def test_the_local_rays_workers_reach_this_cluster_whatever_else_runs_on_the_machine(ray_session):
    # Ray Train's placement-group cleaner asks the state API, which without RAY_ADDRESS takes the
    # latest Ray started on the machine: beside a `ray start` cluster it removed the run's
    # placement group there. Each worker of the local Ray names its own cluster.
    @ray.remote
    def address():
        return os.environ.get("RAY_ADDRESS")

    assert "RAY_ADDRESS" not in os.environ  # the driver's own environment is left alone
    assert ray.get(address.remote()) == ray.get_runtime_context().gcs_address


def test_workers_asking_for_more_cpus_than_the_machine_has_are_warned_of(ray_session, monkeypatch):
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    assert runtime.oversubscription(2, 1) is None
    assert runtime.oversubscription(2, 2) == ("the workers ask for 4 CPUs on a machine with 2: they will share its "
                                              "cores, and fewer workers (or --cpus-per-worker 1) would train faster")
    # Not a setting they already have.
    assert runtime.oversubscription(3, 1).endswith("share its cores, and fewer workers would train faster")
    monkeypatch.setattr(runtime, "started_local_ray", False)  # a cluster's nodes are not this machine
    assert runtime.oversubscription(3, 1) is None


def test_workers_see_the_gpu_they_were_given_and_no_other(monkeypatch):
    import tensorflow as tf

    hidden = []
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda devices, kind: hidden.append((devices, kind)))
    # A GPU node whose TensorFlow was installed without CUDA lists no GPU.
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind: [])
    # TensorFlow's wheel is built with CUDA (as here); without tensorflow[and-cuda]'s libraries it sees no GPU.
    monkeypatch.setattr(runtime, "cuda_libraries_installed", lambda: False)
    with pytest.raises(RuntimeError, match="^--use-gpu: Ray gave this process a GPU, but TensorFlow sees none: its "
                                           "CUDA libraries are not installed; install the gpu extra"):
        runtime.select_devices(use_gpu=True)
    # With them, the install is not what to fix: the driver, or a container not given the GPUs.
    monkeypatch.setattr(runtime, "cuda_libraries_installed", lambda: True)
    monkeypatch.setattr(tf.test, "is_built_with_cuda", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(RuntimeError, match="^--use-gpu: Ray gave this process a GPU, but TensorFlow, with its CUDA "
                                           "libraries, sees none \\(CUDA_VISIBLE_DEVICES='1'\\): check the node's "
                                           "NVIDIA driver"):
        runtime.select_devices(use_gpu=True)
    monkeypatch.setattr(tf.test, "is_built_with_cuda", lambda: False)  # a CPU-only build: the extra, whatever else
    with pytest.raises(RuntimeError, match="its CUDA libraries are not installed; install the gpu extra"):
        runtime.select_devices(use_gpu=True)
    runtime.select_devices(use_gpu=False)
    assert hidden == []  # nothing to hide
    # A CPU worker on a GPU node: Ray leaves the node's GPUs visible to it.
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind: [f"/physical_device:{kind}:0"])
    runtime.select_devices(use_gpu=True)
    assert hidden == []
    runtime.select_devices(use_gpu=False)
    assert hidden == [([], "GPU")]


def test_local_paths_on_a_cluster_of_several_nodes_are_warned_of(ray_session, monkeypatch, capsys):
    paths = {"--data": "/data/carla", "--val-data": None, "--storage-path": "s3://bucket/runs"}
    runtime.warn_of_local_paths(paths, nodes_to_come=True)
    assert capsys.readouterr().err == ""  # the local Ray this machine started: its only node
    monkeypatch.setattr(runtime, "started_local_ray", False)  # as if joined through RAY_ADDRESS
    runtime.warn_of_local_paths(paths, nodes_to_come=False)
    assert capsys.readouterr().err == ""  # a cluster of one node that needs no more
    runtime.warn_of_local_paths(paths, nodes_to_come=True)  # an autoscaler will add the GPU nodes
    assert capsys.readouterr().err == (
        "[unet-ray] warning: --data /data/carla: local to this node, and the cluster's other nodes read and write "
        "there too; unless each mounts it at the same place, pass an s3:// or gs:// URI\n")
    monkeypatch.setattr(runtime.ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}])
    runtime.warn_of_local_paths({"--input": "frames"}, nodes_to_come=False)
    assert "--input frames: local to this node" in capsys.readouterr().err
    runtime.warn_of_local_paths({"--input": "gs://bucket/frames"}, nodes_to_come=False)
    assert capsys.readouterr().err == ""


def test_a_ray_address_where_no_cluster_answers_is_refused_not_waited_for(monkeypatch):
    def init(**kwargs):
        if os.environ["RAY_ADDRESS"] == "auto":
            raise ConnectionError("Could not find any running Ray instance.")  # as ray.init says it
        if os.environ["RAY_ADDRESS"].startswith("ray://"):
            raise ConnectionError("ray client connection timeout")  # and this without a full stop
        raise AssertionError("ray.init retries a host:port where nothing listens for ever")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"  # bound, not listening: refused
        monkeypatch.setenv("RAY_ADDRESS", address)
        with pytest.raises(ValueError, match=f"^RAY_ADDRESS={address}: no Ray cluster answers there \\(Connection "
                                             f"refused\\); unset RAY_ADDRESS to start a Ray of this job's own"):
            runtime.connect()
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # no cluster on this machine: it was a traceback and exit 1
    with pytest.raises(ValueError, match="^RAY_ADDRESS=auto: Could not find any running Ray instance. Unset "
                                         "RAY_ADDRESS to start a Ray of this job's own$"):
        runtime.connect()
    monkeypatch.setenv("RAY_ADDRESS", "ray://127.0.0.1:1")
    with pytest.raises(ValueError, match="^RAY_ADDRESS=ray://127.0.0.1:1: ray client connection timeout\\. Unset "):
        runtime.connect()

    def times_out(*args, **kwargs):  # a host that drops the packets
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", times_out)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(ValueError, match="^RAY_ADDRESS=10.0.0.1:6379: no Ray cluster answers there \\(timed out\\)"):
        runtime.connect()


def test_a_ray_address_where_a_web_server_answers_is_refused_not_waited_for(ray_session, monkeypatch):
    # The dashboard's host:port (what `ray job submit --address` takes) as RAY_ADDRESS: something
    # listens there, and ray.init retried it for ever, a GCS timeout every half minute.
    import http.server
    import threading

    runtime.refuse_unreachable_cluster(ray.get_runtime_context().gcs_address)  # a GCS is taken
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("ray.init retries a web server for ever"))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        address = f"127.0.0.1:{server.server_address[1]}"
        monkeypatch.setenv("RAY_ADDRESS", address)
        try:
            with pytest.raises(ValueError, match=f"^RAY_ADDRESS={address}: a web server answers there, not a Ray "
                                                 f"cluster's GCS"):
                runtime.connect()
        finally:
            server.shutdown()


@pytest.mark.parametrize("flags, native", [("fpu sse avx2 fma", False), ("avx512f avx512_bf16", True),
                                           ("amx_bf16 amx_tile", True), (None, False)])
def test_a_cpu_computes_bfloat16_with_avx512_bf16_or_amx(flags, native, monkeypatch):
    def cpuinfo(path):
        if flags is None:  # not Linux
            raise FileNotFoundError(path)
        return io.StringIO(f"processor\t: 0\nflags\t\t: {flags}\n")

    monkeypatch.setattr(runtime, "open", cpuinfo, raising=False)  # the module's open, before the builtin
    assert runtime.cpu_computes_bfloat16() is native
    assert runtime.native_bfloat16(use_gpu=False) is native  # what --mixed-precision auto asks on a CPU worker


def test_bf16_counts_as_native_on_a_gpu_worker_only_when_every_gpu_it_sees_is_ampere_or_newer(monkeypatch):
    # `auto` precision picks bf16 from this: on a node that mixes a Turing GPU (7.5) with an Ampere
    # one, bf16 would run emulated on the older card, slower than float32. No GPU here, so TensorFlow's
    # answers are those of such nodes.
    import tensorflow as tf

    capabilities = {}
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind: list(capabilities))
    monkeypatch.setattr(tf.config.experimental, "get_device_details",
                        lambda gpu: {} if capabilities[gpu] is None else {"compute_capability": capabilities[gpu]})
    assert not runtime.native_bfloat16(use_gpu=True)  # TensorFlow sees no GPU at all
    capabilities.update({"GPU:0": (8, 6), "GPU:1": (8, 0)})
    assert runtime.native_bfloat16(use_gpu=True)
    capabilities["GPU:2"] = (7, 5)
    assert not runtime.native_bfloat16(use_gpu=True)
    capabilities["GPU:2"] = None  # no compute capability given: not taken for a new one
    assert not runtime.native_bfloat16(use_gpu=True)


def test_use_gpu_where_tensorflow_sees_no_gpu_stops_train_and_infer_before_any_worker_naming_the_fix(tmp_path):
    import tensorflow as tf

    # A node that declares a GPU its TensorFlow cannot use (no CUDA libraries here): every Ray Train worker failed
    # alike, each failure retried --max-failures times (for ever at -1), then exit 1 saying a rerun resumes; every
    # inference actor died with a traceback. A local Ray of its own, declaring a GPU this machine does not have.
    script = "\n".join([
        "import sys, ray",
        "from distributed import runtime",
        "ray.init(address='local', num_cpus=3, num_gpus=1, include_dashboard=False,",
        "         runtime_env={'env_vars': dict(runtime.WORKER_ENV)})",
        "from jobs import infer, train",
        "from unet_core import scenes, unet_model",
        "out = sys.argv[1]",
        "scenes.write_scenes(out + '/frames', 2, seed=0)",
        "unet_model((32, 48, 3), n_filters=4).save(out + '/model.keras', save_format='keras_v3')",
        "codes = [train.main(['--smoke', '--use-gpu', '--num-workers', '1', '--max-failures', '-1',",
        "                     '--output', out + '/run']),",
        "         infer.main(['--use-gpu', '--model', out + '/model.keras', '--input', out + '/frames/CameraRGB',",
        "                     '--output', out + '/masks'])]",
        "print(codes)",
    ])
    job = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert job.stdout.strip().splitlines()[-1] == "[2, 2]", job.stderr[-5000:]
    said = re.findall(r"^error: .*$", job.stderr, re.MULTILINE)
    # The fix this machine's install calls for (the same virtualenv as the job's).
    fix = ("where Ray gives a worker its GPU, TensorFlow sees none: its CUDA libraries are not installed; install the "
           "gpu extra (pip install 'unet-ray[gpu]', which brings tensorflow[and-cuda]) on every GPU node"
           if not (tf.test.is_built_with_cuda() and runtime.cuda_libraries_installed()) else
           "where Ray gives a worker its GPU, TensorFlow, with its CUDA libraries, sees none")
    assert len(said) == 2 and all(line.startswith("error: --use-gpu: on node ") and fix in line for line in said), said
    assert "Started training worker group" not in job.stderr  # asked before any worker, so nothing was retried
    assert not list((tmp_path / "run").glob("ray_results/unet/checkpoint_*")) and not (tmp_path / "masks").exists()


def test_a_worker_whose_exit_hangs_ends_with_the_local_ray_not_after_it():
    # A Ray Train worker asked to exit as jobs.train ended on a SIGTERM, its training thread holding h5py's lock while
    # saving a checkpoint, hung in its exit: an orphan of ~0.9 GB, its Ray long gone. Here one whose exit hangs, and a
    # driver killed outright (its local Ray's raylet and GCS end with it: Ray's fate-sharing).
    script = "\n".join([
        "import atexit, os, time, ray",
        "from distributed import runtime",
        "runtime.connect(num_cpus=1)",
        "@ray.remote",
        "class HangsAsItExits:",
        "    def pid(self):",
        "        return os.getpid()",
        "    def exit(self):",
        "        atexit.register(time.sleep, 10**6)",
        "        ray.actor.exit_actor()",
        "actor = HangsAsItExits.remote()",
        "pid = ray.get(actor.pid.remote())",
        "actor.exit.remote()",
        "time.sleep(3)  # in its exit by now",
        "print(pid, flush=True)",
        "time.sleep(600)",
    ])
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env=env_for_a_ray_of_its_own(), start_new_session=True)
    try:
        worker = int(driver.stdout.readline())
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    deadline = time.time() + 30
    while is_running(worker) and time.time() < deadline:
        time.sleep(0.2)
    alive = is_running(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the worker outlived its local Ray"


def is_running(pid):
    """Whether `pid` is a live process (not one ended, nor a zombie its new parent has yet to reap)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
