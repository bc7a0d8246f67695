"""Starting or joining Ray, the environment every worker and actor runs with, and SIGTERM in a driver running Ray."""

import atexit
import importlib.util
import os
import re
import signal
import socket
import sys
import threading

import ray
from ray.autoscaler.sdk import request_resources

# tf.keras must be tf-keras (Keras 2) in every process: Keras 3 breaks MultiWorkerMirroredStrategy.
WORKER_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}

# Whether `connect` started this process's own local Ray: no node can ever join that one.
started_local_ray = False

# True while `connect` starts a local Ray: each process ray.init spawns then leads a process group of its own.
starting_local_ray = False


def leave_the_drivers_process_group():
    """A SIGTERM to the job's process group (`timeout`, `kill -- -PGID`) then reaches the driver, not its
    local Ray's GCS and raylet: losing those mid-run, Ray's core ended the driver with status 1, at
    times before it said how to go on. They still die with the driver (Ray has the kernel end them)."""
    if starting_local_ray:
        os.setpgrp()


# Run in the child of every fork that returns to Python: Ray spawns its processes with a preexec_fn, which does.
os.register_at_fork(after_in_child=leave_the_drivers_process_group)


def connect(num_cpus=None):
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start local Ray.

    Local Ray gets at least `num_cpus` logical CPUs even on a smaller machine, so Ray Data's
    preprocessing tasks can run beside training workers that hold the real cores. Once Ray is
    started or joined, SIGTERM ends the process in KeyboardInterrupt (`init`).
    """
    os.environ.update(WORKER_ENV)
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        refuse_unreachable_cluster(address)
        # Under `ray job submit` the job's runtime env (--runtime-env-json) applies to every
        # worker, and ray.init refuses one that sets its variables again. Without it, workers
        # still get tf-keras: importing unet_core sets TF_USE_LEGACY_KERAS before tf.keras loads.
        try:
            init(log_to_driver=True)
        except ConnectionError as error:  # RAY_ADDRESS=auto with no cluster on this machine: a traceback, exit 1
            said = str(error).rstrip(".")  # Ray's messages end in a full stop or not ("ray client connection timeout")
            raise ValueError(f"RAY_ADDRESS={address}: {said}. Unset RAY_ADDRESS to start a Ray of this job's "
                             f"own") from None
        return
    global started_local_ray, starting_local_ray
    cpus = max(os.cpu_count() or 1, num_cpus or 0)
    # address="local": always a private Ray for this process, never a cluster someone else
    # started on this machine with `ray start` (that one is reached through RAY_ADDRESS).
    # A copy: ray.init writes the hook's key into the env_vars it is given, and WORKER_ENV goes
    # into os.environ, where every subprocess (a `ray start` of another cluster) would inherit it.
    starting_local_ray = True
    try:
        init(address="local", num_cpus=cpus, include_dashboard=False,
             runtime_env={"env_vars": dict(WORKER_ENV), "worker_process_setup_hook": set_up_local_worker})
    finally:
        starting_local_ray = False
    started_local_ray = True


# What an HTTP/2 client (a gRPC one, as Ray's GCS speaks) sends first.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def refuse_unreachable_cluster(address):
    """A RAY_ADDRESS host:port where nothing listens (a cluster stopped since it was exported), or
    where a web server answers (the dashboard's 8265, which `ray job submit` is given), is a
    ValueError: ray.init would retry it for ever, a warning every few seconds."""
    match = re.fullmatch(r"([^:/]+):(\d+)", address)
    if not match:  # auto, ray://, http://: ray.init says what is wrong with those itself
        return
    try:
        connection = socket.create_connection((match[1], int(match[2])), timeout=10)
    except OSError as error:  # refused, or no answer in 10 s (a firewall that drops the packets)
        raise ValueError(f"RAY_ADDRESS={address}: no Ray cluster answers there ({error.strerror or error}); unset "
                         f"RAY_ADDRESS to start a Ray of this job's own, or start that cluster") from None
    with connection:
        try:
            connection.sendall(HTTP2_PREFACE)
            answer = connection.recv(16)
        except OSError:  # no answer in time, or the line dropped: nothing shows it is no Ray
            return
    # The GCS's gRPC answers in binary (HTTP/2 frames; TLS records with TLS on); a web server in text.
    if answer and 0x20 <= answer[0] < 0x7F:
        raise ValueError(f"RAY_ADDRESS={address}: a web server answers there, not a Ray cluster's GCS (the "
                         f"dashboard's address is for `ray job submit` only); pass the head's GCS address, "
                         f"<head ip>:6379 by default, or unset RAY_ADDRESS to start a Ray of this job's own")


def disconnect():
    """Leave Ray; a local Ray this process started stops with it."""
    global started_local_ray
    ray.shutdown()
    started_local_ray = False


def init(**kwargs):
    """`ray.init`, after which SIGTERM (`kill`, `timeout`, `ray job stop`, a scheduler's time limit)
    ends the driver in KeyboardInterrupt, as Ctrl-C does: each job then says how to go on, exit 130.

    ray.init sets a SIGTERM handler that exits 15, saying nothing, and Ray's C++ core puts absl's
    failure-signal handler before it ("*** SIGTERM received"), which also sets a 3 s alarm that
    aborts the process (exit 134), cutting short whatever is still under way (a commit, Ray's
    shutdown). A handler set from Python replaces both, for the rest of the process.

    Not Ray Train's Ctrl-C handler, which waits for its run to abort: a scheduler may signal every
    process of the job, and the local Ray's GCS, gone with them, would never answer (exit 1 a minute
    later). The driver's end takes its run down with it, as a lost driver's does.
    """
    try:
        ray.init(**kwargs)
    except SystemExit as ended:  # SIGTERM while ray.init ran, once its handler was set
        if ended.code != signal.SIGTERM:
            raise
        signal.alarm(0)  # absl's, which would abort the process 3 s on
        raise KeyboardInterrupt(f"signal {signal.SIGTERM}") from None
    finally:
        if threading.current_thread() is threading.main_thread():  # the only thread that may set one
            signal.signal(signal.SIGTERM, interrupt)
    # Runs before Ray's own shutdown at exit, which ray registered as it was imported.
    atexit.unregister(ignore_interrupts_while_exiting)
    atexit.register(ignore_interrupts_while_exiting)


def interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def ignore_interrupts_while_exiting():
    """A driver that started or joined Ray, at exit: a second Ctrl-C or SIGTERM cut Ray's shutdown short,
    and the local Ray's dashboard and runtime-env agents outlived the job, orphans that ignore SIGTERM."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def set_up_local_worker():
    """Run in every worker of a local Ray: it ends with the raylet (`end_with_the_raylet`), and Ray
    Train's placement-group cleaner, which asks the state API every second whether the run's
    controller lives, asks this cluster.

    The state API finds its cluster by RAY_ADDRESS, else by the Ray instances running on the
    machine, and of several it takes the latest started: a `ray start` cluster beside this private
    one. There it finds no such controller, takes the run for over, and removes the placement group
    it was handed, the one the run's workers hold. RAY_ADDRESS pins it to this cluster.

    Without the dashboard (local Ray here) it cannot get an answer and logs a warning each time: a
    line a second on the console for the whole run. Its job, removing a dead controller's placement
    group, ends with a local Ray anyway."""
    import logging

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    end_with_the_raylet()


def end_with_the_raylet():
    """Have the kernel end this worker of a local Ray when its raylet ends, as Ray has it end the
    raylet with the driver. A worker asked to exit as the job ended (a SIGTERM to jobs.train) while
    its training thread held h5py's lock, saving a checkpoint, hung in its exit for good: an orphan
    holding ~0.9 GB after the job and its Ray were gone. Linux only, as Ray's own fate-sharing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    raylet = os.environ.get("RAY_RAYLET_PID")
    if raylet and os.getppid() != int(raylet):  # it ended before the line above: no signal will come
        os.kill(os.getpid(), signal.SIGKILL)


def quiet_per_epoch_logs():
    """Run in every training worker. Each epoch Ray Train logs the whole report it is handed and
    Ray Data logs each pass over the validation set: with the pass's progress bar (turned off in
    `ingest.load_frames`), five lines of Ray's beside the run's own line every epoch (1,500 in a
    250-epoch run). Warnings still show."""
    import logging

    from ray.train.v2._internal.execution import context  # its logger is named after its file

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)


def workers_that_fit(cpus_per_worker, gpus_per_worker=0, memory_per_worker=0):
    """How many workers (or actors) the cluster's live nodes hold now: one cannot span nodes.
    `memory_per_worker` (bytes) counts against what Ray gives tasks of a node's memory."""
    fit = 0
    for node in ray.nodes():
        if node["Alive"]:
            resources = node["Resources"]
            on_node = int(resources.get("CPU", 0) // cpus_per_worker)
            if gpus_per_worker:
                on_node = min(on_node, int(resources.get("GPU", 0) // gpus_per_worker))
            if memory_per_worker:
                on_node = min(on_node, int(resources.get("memory", 0) // memory_per_worker))
            fit += on_node
    return fit


def cluster_shortfall(num_workers, cpus_per_worker, use_gpu, what="training workers",
                      flags=("--num-workers", "--cpus-per-worker"), waits="Ray Train will wait until nodes are added"):
    """What is missing when the cluster holds fewer workers (or actors: `what`) than asked for, else None.

    Ray then waits for the missing nodes without end: right on an autoscaling cluster whose GPU
    nodes are still starting, a silent hang on a fixed one. See `refuse_or_warn`.
    """
    fit = workers_that_fit(cpus_per_worker, 1 if use_gpu else 0)
    if fit >= num_workers:
        return None
    per_worker = f"{cpus_per_worker} CPU{'s' if cpus_per_worker > 1 else ''}" + (" + 1 GPU" if use_gpu else "")
    remedy = f"lower {flags[0]} or {flags[1]}{', or drop --use-gpu' if use_gpu else ''}"
    if started_local_ray:
        return (f"the local Ray this job started holds {fit} of the {num_workers} {what} asked for ({per_worker} "
                f"each), and no node can join it: {remedy} (or submit the job to a cluster that has them)")
    return (f"the cluster holds {fit} of the {num_workers} {what} asked for ({per_worker} each, on one node); "
            f"{waits}. On a cluster that does not autoscale, {remedy}.")


def oversubscription(processes, cpus_each, what="workers", fewer=None):
    """A warning when the local Ray this job started gives its workers more CPUs than the machine
    has: `connect` lets it, so Ray Data's tasks can run beside them, but workers then share cores
    and an epoch takes longer than fewer workers would (11 s instead of 4 s: 3 workers on 2 cores)."""
    cores, cpus = os.cpu_count() or 1, processes * cpus_each
    fewer = fewer or f"fewer workers{' (or --cpus-per-worker 1)' if cpus_each > 1 else ''} would train faster"
    if started_local_ray and cpus > cores:
        return f"the {what} ask for {cpus} CPUs on a machine with {cores}: they will share its cores, and {fewer}"
    return None


def refuse_or_warn(shortfall):
    """A shortfall is an error on the local Ray `connect` started, where Ray would wait forever;
    on a cluster, a warning, since an autoscaler may still add the nodes."""
    if shortfall and started_local_ray:
        raise ValueError(shortfall)
    if shortfall:
        print(f"[unet-ray] warning: {shortfall}", file=sys.stderr, flush=True)


def warn_of_local_paths(paths, nodes_to_come, passed_as=None):
    """On a cluster of several nodes (or one that must add nodes for this job: `nodes_to_come`),
    Ray runs a job's tasks and workers on any of them, where a path local to this node is missing
    unless every node mounts it at the same place. `paths`: {flag: path or URI or None}; `passed_as`:
    {name in `paths`: the flag that takes a URI in its place}, for a path no flag gave (below --output)."""
    if started_local_ray or (sum(node["Alive"] for node in ray.nodes()) < 2 and not nodes_to_come):
        return
    local = [name for name, path in paths.items() if path is not None and "://" not in path]
    if local:
        # --output itself takes no URI: a URI for the scenes or checkpoints below it goes to another flag.
        instead = sorted({passed_as[name] for name in local if name in (passed_as or {})})
        named = "; ".join(f"{name} {paths[name]}" for name in local)
        print(f"[unet-ray] warning: {named}: local to this node, and the cluster's other nodes read and write there "
              f"too; unless each mounts it at the same place, pass an s3:// or gs:// URI"
              + (f" (as {', '.join(instead)})" if instead else ""), file=sys.stderr, flush=True)


def configure_tensorflow_threads(num_threads):
    """Size TF's pools to the CPUs Ray gave this process, so workers don't oversubscribe cores."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(num_threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, num_threads)))


def select_devices(use_gpu):
    """Run in every worker and actor, before TensorFlow starts. With --use-gpu, TensorFlow must see
    the GPU Ray gave the process: without CUDA it would compute on the CPU in float32 while the GPU
    sat reserved. Without --use-gpu it sees none: Ray 2.60 leaves a node's GPUs visible to a
    process that asked for none, and TensorFlow would take most of a GPU's memory in each."""
    import tensorflow as tf

    problem = gpu_problem() if use_gpu else None
    if problem:
        raise RuntimeError(f"--use-gpu: Ray gave this process a GPU, but {problem}")
    if not use_gpu and tf.config.list_physical_devices("GPU"):
        tf.config.set_visible_devices([], "GPU")


def gpu_problem():
    """Why TensorFlow in this process sees no GPU, with the fix; None when it sees one."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return None
    # TensorFlow's own reason (a CUDA library it could not load) is a warning, which WORKER_ENV silences.
    if not (tf.test.is_built_with_cuda() and cuda_libraries_installed()):
        return ("TensorFlow sees none: its CUDA libraries are not installed; install the gpu extra (pip install "
                "'unet-ray[gpu]', which brings tensorflow[and-cuda]) on every GPU node")
    return (f"TensorFlow, with its CUDA libraries, sees none (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): check the node's NVIDIA driver (nvidia-smi) and, in a "
            f"container, that it was given the GPUs (docker run --gpus all)")


def cuda_libraries_installed():
    """Whether tensorflow[and-cuda]'s CUDA libraries (nvidia-cudnn, nvidia-cublas) are: TensorFlow's
    own wheel is built with CUDA, but finds no GPU without them."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("nvidia.cudnn", "nvidia.cublas"))
    except ModuleNotFoundError:  # no nvidia-* package at all
        return False


def check_a_gpu_node(cpus, processes):
    """With --use-gpu, asked once before the workers or actors start: does TensorFlow see the GPU, where
    Ray puts a process of `cpus` CPUs and a GPU? Else each worker would fail alike, and Ray Train
    retry each failure (--max-failures times, for ever at -1) before saying why. One node answers:
    the nodes of a cluster share their image. An autoscaler is asked for the nodes of all `processes`
    at once, so that the check's node does not start alone, ahead of the others."""
    request_resources(bundles=[{"CPU": cpus, "GPU": 1}] * processes)
    try:
        asked = ray.remote(num_cpus=cpus, num_gpus=1, max_retries=0)(_gpu_problem_on_node).remote()
        while not ray.wait([asked], timeout=60)[0]:
            print(f"[unet-ray] --use-gpu: waiting for a node with {cpus} CPU(s) and a GPU free, to check that "
                  f"TensorFlow sees its GPU there", file=sys.stderr, flush=True)
        try:
            problem, node = ray.get(asked)
        except ray.exceptions.RayError as error:
            raise ValueError(f"--use-gpu: checking TensorFlow on a GPU node failed: {error}") from None
    finally:
        request_resources(bundles=[])  # the workers' and actors' own requests keep their nodes from here
    if problem:
        raise ValueError(f"--use-gpu: on node {node}, where Ray gives a worker its GPU, {problem}")


def _gpu_problem_on_node():
    # A task with a GPU never runs in a process that later runs another: Ray ends it after one call.
    return gpu_problem(), ray.util.get_node_ip_address()


def leave_gpus_to_actors():
    """For a driver that only checks a model, reads its shapes or draws previews with it: TensorFlow would
    take most of a GPU's memory at its first use, and hold it for the whole job, so the workers and
    inference actors Ray puts on the driver's GPU (a GPU workstation's, a GPU head's) would have little left."""
    try:
        select_devices(False)
    except RuntimeError:  # TensorFlow already runs in this process (a notebook): it holds its devices already
        pass


def native_bfloat16(use_gpu):
    """Whether this worker computes bfloat16 in hardware, so mixed precision pays instead of costs:
    on GPUs, compute capability 8.0 or newer (Ampere on); on CPUs, AVX512-BF16 or AMX."""
    if not use_gpu:
        return cpu_computes_bfloat16()
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    capabilities = [tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0)
                    for gpu in gpus]
    return bool(gpus) and min(capabilities) >= (8, 0)


def cpu_computes_bfloat16():
    """Whether this machine's CPU has AVX512-BF16 or AMX (read without TensorFlow, for the benchmarks too)."""
    try:
        with open("/proc/cpuinfo") as file:
            flags = set(file.read().split())
    except OSError:  # not Linux: no cheap way to tell, stay in float32
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})
