"""cluster.yaml and README's "Run on a cluster": a launchable cluster, commands that exist.

Nothing here talks to a cloud: the cluster config goes through Ray's own schema validation and
these checks; every README command is parsed by the real CLI it names (Ray's click commands,
the jobs' argparse parsers) without running it.
"""

import contextlib
import fnmatch
import importlib
import io
import json
import re
import shlex
import tomllib
from pathlib import Path

import click
import pytest
import ray
import yaml
from ray.scripts.scripts import cli as ray_cli

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
GPU_INSTANCE_FAMILIES = ("g4dn", "g5", "g6", "g6e", "p3", "p4d", "p4de", "p5")
DASHBOARD_PORTS = (8265, 6379, 10001)  # dashboard + job API, GCS, Ray client


@pytest.fixture(scope="module")
def text():
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def config(text):
    return yaml.safe_load(text)


def start_commands(config, key):
    """The `ray start` invocations of head_ or worker_start_ray_commands, as argument lists."""
    found = []
    for command in config[key]:
        for part in command.split(";"):
            words = shlex.split(part)
            if words[:2] == ["ray", "start"]:
                found.append(words)
    return found


# --- cluster.yaml ------------------------------------------------------------------------------

def test_passes_rays_own_cluster_config_validation(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))  # raises on any schema violation
    assert config["provider"]["type"] == "aws"


def test_head_node_type_is_defined_and_a_gpu_worker_type_autoscales(config):
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types
    assert types[head].get("resources", {}).get("GPU", 0) == 0  # the head is a CPU node

    def has_gpu(node_type):
        instance = node_type["node_config"].get("InstanceType", "")
        return node_type.get("resources", {}).get("GPU", 0) >= 1 or instance.split(".")[0] in GPU_INSTANCE_FAMILIES

    workers = {name: node_type for name, node_type in types.items() if name != head and has_gpu(node_type)}
    assert workers, "no GPU worker node type"
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0 < node_type["max_workers"] <= config["max_workers"], name
        # Ray Train workers upload checkpoints to the bucket themselves: they need an instance profile.
        assert "IamInstanceProfile" in node_type["node_config"], name


def test_docker_image_is_ray_2_60_python_3_11_gpu(config):
    image = config["docker"]["image"]
    assert image == "rayproject/ray:2.60.0-py311-gpu"
    assert image.split(":")[1].split("-")[0] == ray.__version__  # the Ray this project pins and tests
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert '"ray[default,train,data]>=2.60,<2.61"' in json.dumps(pyproject["project"]["dependencies"])


def test_gpu_workers_containers_are_given_the_gpus(config):
    # Not left to Ray's guess from `docker info`: a container without them would see no GPU on a node that
    # advertises one, and every --use-gpu worker placed there would fail.
    gpu_nodes = config["available_node_types"]["ray.worker.gpu"]
    assert gpu_nodes["resources"]["GPU"] >= 1 and "--gpus all" in gpu_nodes["docker"]["worker_run_options"]
    # Only there: a node without GPUs (the head, a CPU type added later) would fail `docker run` with it.
    assert "--gpus all" not in json.dumps({key: value for key, value in config["docker"].items()})
    assert "docker" not in config["available_node_types"]["ray.head.cpu"]


def test_setup_commands_install_this_project_with_its_gpu_extra(config):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "gpu" in pyproject["project"]["optional-dependencies"]
    # The checkout is synced to the nodes...
    synced = [remote for remote, local in config["file_mounts"].items() if local in (".", "./")]
    assert len(synced) == 1
    remote = synced[0].replace("/home/ray/", "~/")
    # ...and installed from there, with the gpu extra.
    installs = [command for command in config["setup_commands"]
                if re.search(r"pip install .*-e \"?\.\[gpu\]\"?", command)]
    assert installs, config["setup_commands"]
    assert all(re.search(rf"cd ({re.escape(synced[0])}|{re.escape(remote)}) &&", command) for command in installs)


def test_every_ray_process_gets_tf_keras_and_token_auth(config):
    run_options = " ".join(config["docker"].get("run_options", []))
    bashrc = " ".join(config["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = " ".join(config[key])
        assert start_commands(config, key), key
        for variable in ("TF_USE_LEGACY_KERAS=1", "RAY_AUTH_MODE=token"):
            assert variable in commands and f"--env {variable}" in run_options
            assert f"export {variable}" in bashrc
    # The token `ray get-auth-token --generate` made goes to every node.
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


def test_ray_start_commands_are_valid_ray_2_60_invocations(config):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for words in start_commands(config, key):
            ray_cli.commands["start"].make_context("start", words[2:])  # raises on unknown flags


def test_dashboard_never_listens_beyond_loopback(config, text):
    assert "0.0.0.0" not in text  # neither a dashboard host nor an open CIDR anywhere
    for words in start_commands(config, "head_start_ray_commands"):
        assert "--dashboard-host=127.0.0.1" in words
    # The security group opens none of the dashboard / job / GCS / client ports: today, no port at all.
    assert config["provider"]["security_group"]["IpPermissions"] == []
    for rule in config["provider"]["security_group"]["IpPermissions"]:  # for when rules are added
        low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
        assert not any(low == -1 or low <= port <= high for port in DASHBOARD_PORTS), rule


# --- README "Run on a cluster" -----------------------------------------------------------------

@pytest.fixture(scope="module")
def readme_commands():
    """Every command in the section's bash blocks, as words: `NAME=value` prefixes and output
    redirections dropped, variables the section exports ($BUCKET) expanded."""
    readme = (REPO / "README.md").read_text()
    assert "\n## Run on a cluster\n" in readme
    section = readme.split("\n## Run on a cluster\n", 1)[1].split("\n## ", 1)[0]
    exported = {}

    def expand(word):
        return re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: exported.get(m.group(1), m.group(0)), word)

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = [expand(word) for word in shlex.split(line, comments=True)]
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words.pop(0)
            for redirection in (">", ">>", "2>"):
                while redirection in words:
                    del words[words.index(redirection):words.index(redirection) + 2]
            if words[:1] == ["export"]:
                exported.update(word.split("=", 1) for word in words[1:])
            elif words:
                commands.append(words)
    assert "BUCKET" in exported
    return commands


def ray_command(words):
    """(click command, its arguments) for `ray a b ...`."""
    command, args = ray_cli, words[1:]
    while isinstance(command, click.Group):
        assert args and args[0] in command.commands, f"not a ray command: {' '.join(words)}"
        command, args = command.commands[args[0]], args[1:]
    return command, args


def job_help(module):
    output = io.StringIO()
    with contextlib.redirect_stdout(output), pytest.raises(SystemExit):
        module.parse_args(["--help"])
    return output.getvalue()


def test_readme_ray_commands_parse_with_the_installed_ray(readme_commands):
    ray_commands = [words for words in readme_commands if words[0] == "ray"]
    used = {" ".join(words[:3]) if words[1] == "job" else " ".join(words[:2]) for words in ray_commands}
    assert {"ray up", "ray dashboard", "ray job submit", "ray job logs", "ray job status", "ray down"} <= used
    for words in ray_commands:
        command, args = ray_command(words)
        command.make_context(command.name, list(args))  # raises on an unknown flag or a missing argument
        if words[1] in ("up", "down", "dashboard", "rsync-down"):
            assert "cluster.yaml" in args


def test_readme_jobs_exist_and_accept_their_flags(readme_commands):
    submits = [words for words in readme_commands if words[:3] == ["ray", "job", "submit"]]
    assert submits
    seen = set()
    submission_ids = set()
    for words in submits:
        options, entrypoint = words[:words.index("--")], words[words.index("--") + 1:]
        assert options[options.index("--address") + 1] == "http://127.0.0.1:8265"  # the SSH tunnel
        assert options[options.index("--working-dir") + 1] == "."
        runtime_env = json.loads(options[options.index("--runtime-env-json") + 1])
        assert runtime_env == {"env_vars": {"TF_USE_LEGACY_KERAS": "1"}}
        submission_ids.add(options[options.index("--submission-id") + 1])

        assert entrypoint[:2] == ["python", "-m"] and entrypoint[2].startswith("jobs.")
        name = entrypoint[2].split(".", 1)[1]
        assert (REPO / "jobs" / f"{name}.py").is_file(), entrypoint[2]
        module = importlib.import_module(entrypoint[2])
        help_text = job_help(module)
        flags = [word.split("=")[0] for word in entrypoint[3:] if word.startswith("--")]
        for flag in flags:
            assert re.search(rf"{re.escape(flag)}\b", help_text), f"{entrypoint[2]} has no {flag}"
        module.parse_args(entrypoint[3:])  # the whole argument list parses
        seen.add(name)
        if name == "train":
            values = dict(zip(entrypoint[3:], entrypoint[4:]))
            assert "://" in values["--storage-path"]  # checkpoints in shared storage, not on a node
            assert values["--output"].startswith("/")  # not inside the job's temporary working dir
            assert "--use-gpu" in flags
    assert {"train", "infer"} <= seen
    # `ray job logs/status/stop` name a job that the section submits.
    for words in readme_commands:
        if words[:2] == ["ray", "job"] and words[2] in ("logs", "status", "stop"):
            assert words[-1] in submission_ids, words


def test_the_heads_role_may_launch_the_workers_as_configured(config, readme_commands):
    # The autoscaler calls RunInstances with the head's role. For a `resolve:ssm:` ImageId, EC2
    # resolves the parameter with the caller's own ssm:GetParameters, which AWS's EC2 and S3
    # full-access policies (all ray-autoscaler-v1 holds) do not grant.
    puts = [words for words in readme_commands if words[:3] == ["aws", "iam", "put-role-policy"]]
    assert len(puts) == 1, puts
    role = "arn:aws:iam::123456789012:role/ray-autoscaler-v1"
    policy = json.loads(puts[0][puts[0].index("--policy-document") + 1].replace("$ROLE", role))
    assert puts[0][puts[0].index("--role-name") + 1] == "ray-autoscaler-v1"

    def granted(action, resource):
        for statement in policy["Statement"]:
            actions, resources = (statement[key] if isinstance(statement[key], list) else [statement[key]]
                                  for key in ("Action", "Resource"))
            if statement["Effect"] == "Allow" and action in actions and any(
                    fnmatch.fnmatchcase(resource, pattern) for pattern in resources):
                return True
        return False

    region = config["provider"]["region"]
    head = config["head_node_type"]
    for name, node_type in config["available_node_types"].items():
        if name == head:
            continue  # `ray up` launches the head with the user's own credentials
        node_config = node_type["node_config"]
        if "IamInstanceProfile" in node_config:
            assert granted("iam:PassRole", role), name
        image = node_config["ImageId"]
        if image.startswith("resolve:ssm:"):
            parameter = image.removeprefix("resolve:ssm:")
            # A public parameter's ARN has no account.
            assert granted("ssm:GetParameters", f"arn:aws:ssm:{region}::parameter{parameter}"), (name, image)
