"""Offline checks of the deployment files: no docker, no kubectl, no cluster.

What they catch: manifests Kubernetes would reject, a compose file that is not compose, a
Dockerfile that runs as root or has no health check, and drift between the deployment files and
the code (a `memstore serve` flag or MEMSTORE_* variable that ServerConfig does not have, a config
file key it rejects) or between the files themselves (ports, shard counts, labels, uids).
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from memstore.config import FIELDS, ConfigError, build_config, load_env, load_file

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"

# Oldest Kubernetes we claim (PDB unhealthyPodEvictionPolicy is GA in 1.31) and the newest the
# installed kubernetes-validate knows.
K8S_VERSIONS = ["1.31.0", kubernetes_validate.latest_version()]
GRPC_PORT, METRICS_PORT = 50051, 9100
SERVE_FLAGS_NOT_IN_CONFIG = {"config"}   # --config names the file; it is not itself an option


# ---------------------------------------------------------------------------------------------
# Loading


def load_yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def k8s_resources() -> list[dict]:
    """What `kubectl apply -k` would send, minus kustomize's edits: every listed resource."""
    return [doc for name in kustomization()["resources"] for doc in load_yaml_docs(K8S / name)]


def k8s_object(kind: str) -> dict:
    (found,) = [doc for doc in k8s_resources() if doc["kind"] == kind]
    return found


def memstore_container() -> dict:
    (container,) = k8s_object("StatefulSet")["spec"]["template"]["spec"]["containers"]
    return container


def dockerfile_instructions() -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue                     # comments may sit between continued lines too
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    out, stage = [], ""
    for line in logical:
        instruction, _, args = line.strip().partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
            stage = match.group(1) if match else ""
        out.append((stage, instruction, args.strip()))
    return out


def stage_instructions(stage: str) -> list[tuple[str, str]]:
    return [(ins, args) for st, ins, args in dockerfile_instructions() if st == stage]


def serve_option_names(argv: list[str]) -> list[str]:
    """The option names (`shard_index`, ...) of a `memstore serve ...` argument list."""
    assert argv[0] == "serve", f"expected a `serve` command, got {argv}"
    return [arg[2:].split("=", 1)[0].replace("-", "_") for arg in argv[1:] if arg.startswith("--")]


def option_value(argv: list[str], name: str) -> str | None:
    """The value of `--name V` or `--name=V` in argv, None when absent."""
    flag = "--" + name.replace("_", "-")
    for i, arg in enumerate(argv):
        if arg == flag:
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def serve_flags(argv: list[str]) -> dict[str, str]:
    """The ServerConfig options a `memstore serve ...` argument list sets (not --config)."""
    return {name: option_value(argv, name) for name in serve_option_names(argv)
            if name not in SERVE_FLAGS_NOT_IN_CONFIG}


def env_file(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())   # safe_load resolves the `<<: *memstore` merges


def compose_shards() -> dict[str, dict]:
    return {name: svc for name, svc in compose()["services"].items() if name.startswith("memstore-")}


def every_serve_command() -> dict[str, list[str]]:
    """Every `memstore serve` argument list in the deployment files, by where it comes from."""
    commands = {f"compose {name}": svc["command"] for name, svc in compose_shards().items()}
    commands["k8s StatefulSet"] = memstore_container()["args"]
    (cmd,) = [json.loads(args) for ins, args in stage_instructions("server") if ins == "CMD"]
    commands["Dockerfile CMD"] = cmd
    return commands


# ---------------------------------------------------------------------------------------------
# Kubernetes


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate_strictly(version: str):
    # strict: unknown fields are errors, so a misspelt key cannot be silently dropped.
    for doc in k8s_resources():
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_catches_a_misspelt_field():
    doc = k8s_object("StatefulSet")
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_exactly_the_manifests():
    kust = kustomization()
    listed = kust["resources"]
    assert len(listed) == len(set(listed))
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == manifests, "every manifest in deploy/k8s is listed, and nothing else"
    generated = [f.split("=")[-1] for gen in kust["configMapGenerator"]
                 for f in gen.get("files", []) + gen.get("envs", [])]
    for name in generated:
        assert (K8S / name).is_file(), f"configMapGenerator source {name} is missing"
    for doc in k8s_resources():
        # kustomize's `namespace:` places everything; a hard-coded one would escape overlays.
        assert "namespace" not in doc["metadata"], doc["metadata"]["name"]


def test_config_files_are_accepted_by_server_config():
    # load_file/load_env raise ConfigError on unknown keys or bad values: the same check the
    # server does at start, so a typo fails here instead of in a crash-looping pod.
    config = load_file(K8S / "memstore.toml")
    load_env(env_file(K8S / "memstore.env"))
    grace = k8s_object("StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain_s, grace_s = (config.get(name, FIELDS[name].default) for name in ("drain_s", "grace_s"))
    assert grace >= drain_s + 2 * grace_s, "the pod must outlive the drain, the RPC grace period and a RAM snapshot"
    readiness = memstore_container()["readinessProbe"]
    assert drain_s >= readiness["periodSeconds"] * readiness["failureThreshold"], \
        "the drain must last until the readiness probe has seen NOT_SERVING"


def test_statefulset_is_one_pod_per_shard():
    sts = k8s_object("StatefulSet")
    args = memstore_container()["args"]
    assert option_value(args, "shard_index") == "auto"
    assert int(option_value(args, "shard_count")) == sts["spec"]["replicas"]
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain",
                                                                   "whenScaled": "Retain"}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in memstore_container()["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == option_value(args, "data_dir")
    # Service links inject MEMSTORE_*_PORT variables that the server rejects as unknown options.
    assert sts["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_config_file_is_mounted_where_config_points():
    spec = k8s_object("StatefulSet")["spec"]["template"]["spec"]
    config_path = Path(option_value(memstore_container()["args"], "config"))
    (mount,) = [m for m in memstore_container()["volumeMounts"] if m["name"] == "config"]
    assert config_path.parent == Path(mount["mountPath"]) and mount.get("readOnly")
    (volume,) = [v for v in spec["volumes"] if v["name"] == "config"]
    generators = {g["name"]: g for g in kustomization()["configMapGenerator"]}
    assert config_path.name in generators[volume["configMap"]["name"]]["files"]
    (env_from,) = memstore_container()["envFrom"]
    assert env_from["configMapRef"]["name"] in generators


def test_service_is_headless_and_selects_the_pods():
    sts, svc = k8s_object("StatefulSet"), k8s_object("Service")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True, "a shard's name must resolve while it restarts"
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Service": svc["spec"]["selector"],
        "StatefulSet": sts["spec"]["selector"]["matchLabels"],
        "PodDisruptionBudget": k8s_object("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        "NetworkPolicy": k8s_object("NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector.items() <= pod_labels.items(), f"{kind} does not select the memstore pods"


def test_ports_agree_between_args_service_probes_and_policy():
    container = memstore_container()
    args = container["args"]
    grpc_port = int(option_value(args, "port") or FIELDS["port"].default)
    metrics_port = int(option_value(args, "metrics_port"))
    assert (grpc_port, metrics_port) == (GRPC_PORT, METRICS_PORT)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port}
    for svc_port in k8s_object("Service")["spec"]["ports"]:
        assert ports[svc_port["targetPort"]] == svc_port["port"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
    assert container["readinessProbe"]["grpc"]["service"] == "memstore.v1.MemStore"
    annotations = k8s_object("StatefulSet")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == metrics_port
    policy_ports = sorted(p["port"] for rule in k8s_object("NetworkPolicy")["spec"]["ingress"]
                          for p in rule["ports"])
    assert policy_ports == sorted([grpc_port, metrics_port])


def test_network_policy_admits_trainers_and_monitoring_only():
    rules = k8s_object("NetworkPolicy")["spec"]["ingress"]
    by_port = {rule["ports"][0]["port"]: rule["from"] for rule in rules}
    trainers = {"app.kubernetes.io/component": "trainer"}
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    assert by_port[GRPC_PORT] == [{"podSelector": {"matchLabels": trainers}}]
    assert by_port[METRICS_PORT] == [{"namespaceSelector": {"matchLabels": monitoring}}]


def test_pods_run_unprivileged():
    pod = k8s_object("StatefulSet")["spec"]["template"]["spec"]
    container = memstore_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid()
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"requests", "limits"} <= container["resources"].keys()
    # The token comes from an optional Secret: never a literal in a manifest.
    (token,) = [e for e in container["env"] if e["name"] == "MEMSTORE_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"]["optional"] is True and "value" not in token
    assert not any(doc["kind"] == "Secret" for doc in k8s_resources())


def test_disruption_budget_keeps_drains_possible():
    # 0 would block every node drain; more than 1 stalls training on several shards at once.
    assert k8s_object("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


# ---------------------------------------------------------------------------------------------
# Every deployment file against ServerConfig


@pytest.mark.parametrize("source", sorted(every_serve_command()))
def test_serve_flags_exist_in_server_config(source: str):
    argv = every_serve_command()[source]
    unknown = set(serve_option_names(argv)) - set(FIELDS) - SERVE_FLAGS_NOT_IN_CONFIG
    assert not unknown, f"{source}: `memstore serve` has no options {sorted(unknown)}"


def test_deployments_start_without_a_token_only_where_the_network_protects_them():
    """Protected mode: a shard on 0.0.0.0 without a token starts only with allow_unauthenticated,
    which compose (ports on loopback) and k8s (NetworkPolicy) set; the bare image refuses."""
    shard = next(iter(compose_shards().values()))
    environment = {k: v for k, v in shard["environment"].items() if k != "MEMSTORE_TOKEN"}  # unset in the shell
    assert build_config(None, serve_flags(shard["command"]), environment).allow_unauthenticated
    k8s_flags = {**serve_flags(memstore_container()["args"]), "shard_index": "0"}  # auto needs a pod name
    assert build_config(K8S / "memstore.toml", k8s_flags, env_file(K8S / "memstore.env")).allow_unauthenticated
    (cmd,) = [json.loads(args) for ins, args in stage_instructions("server") if ins == "CMD"]
    with pytest.raises(ConfigError, match="without authentication"):
        build_config(None, serve_flags(cmd), {})
    build_config(None, serve_flags(cmd), {"MEMSTORE_TOKEN": "a-token"})


def test_environment_variables_exist_in_server_config():
    load_env(next(iter(compose_shards().values()))["environment"])   # raises on unknown MEMSTORE_*
    env_names = {e["name"] for e in memstore_container()["env"]}
    load_env({name: "1" for name in env_names - {"MEMSTORE_TOKEN"}})
    assert "token" in FIELDS


# ---------------------------------------------------------------------------------------------
# docker-compose.yml and prometheus.yml


def check_compose(path: Path) -> subprocess.CompletedProcess:
    """check-jsonschema against the compose-spec schema it vendors (no network)."""
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(command, check=False, capture_output=True, text=True)


def test_compose_matches_the_compose_spec(tmp_path: Path):
    pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema (dev extra)")
    result = check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    # ...and the schema is strict enough to notice a misspelt service key.
    broken = compose()
    broken["services"]["trainer"]["depends_onn"] = broken["services"]["trainer"].pop("depends_on")
    (tmp_path / "compose.yml").write_text(yaml.safe_dump(broken))
    assert check_compose(tmp_path / "compose.yml").returncode != 0


def test_compose_shards_cover_every_index_once():
    shards = compose_shards()
    count = {int(svc["environment"]["MEMSTORE_SHARD_COUNT"]) for svc in shards.values()}
    assert count == {len(shards)}
    indices = sorted(int(option_value(svc["command"], "shard_index")) for svc in shards.values())
    assert indices == list(range(len(shards)))
    declared = compose()["volumes"]
    data_volumes = set()
    for name, svc in shards.items():
        assert svc["environment"]["MEMSTORE_BACKEND"] == "lmdb"
        assert "memstore" in svc["healthcheck"]["test"] and "health" in svc["healthcheck"]["test"]
        (volume,) = svc["volumes"]
        source, target = volume.split(":")[:2]
        assert source in declared and target == svc["environment"]["MEMSTORE_DATA_DIR"], name
        data_volumes.add(source)
    assert len(data_volumes) == len(shards), "each shard needs its own volume"


def test_compose_trainer_waits_for_and_targets_every_shard_in_order():
    services, shards = compose()["services"], compose_shards()
    trainer = services["trainer"]
    assert trainer["build"]["target"] == "trainer"
    assert trainer["depends_on"] == {name: {"condition": "service_healthy"} for name in shards}
    targets = option_value(trainer["command"], "memstore").split(",")
    by_index = sorted(shards, key=lambda n: int(option_value(shards[n]["command"], "shard_index")))
    assert targets == [f"{name}:{GRPC_PORT}" for name in by_index]
    health_target = shards[by_index[0]]["healthcheck"]["test"][-1]
    assert health_target.endswith(f":{GRPC_PORT}")
    # The trainer reads the shards' token from the same variable (clients read MEMSTORE_TOKEN).
    assert {svc["environment"]["MEMSTORE_TOKEN"] for svc in shards.values()} == {trainer["environment"]["MEMSTORE_TOKEN"]}


def test_prometheus_scrapes_every_shard_metrics_port():
    shards = compose_shards()
    metrics_port = {int(svc["environment"]["MEMSTORE_METRICS_PORT"]) for svc in shards.values()}
    assert metrics_port == {METRICS_PORT}
    (job,) = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert sorted(targets) == sorted(f"{name}:{METRICS_PORT}" for name in shards)
    mounts = compose()["services"]["prometheus"]["volumes"]
    assert any(m.startswith("./deploy/prometheus.yml:") for m in mounts)


# ---------------------------------------------------------------------------------------------
# deploy/Dockerfile and .dockerignore


def image_uid() -> int:
    (user,) = {args for ins, args in stage_instructions("server") if ins == "USER"}
    return int(user.split(":")[0])


def test_dockerfile_is_multi_stage_and_server_is_the_default():
    froms = [(stage, args) for stage, ins, args in dockerfile_instructions() if ins == "FROM"]
    stages = [stage for stage, _ in froms]
    assert len(froms) >= 3 and len(set(stages)) == len(stages)
    assert {"builder", "trainer", "server"} <= set(stages)
    assert stages[-1] == "server", "a plain `docker build` must produce the daemon"
    copies = [args for ins, args in stage_instructions("server") if ins == "COPY"]
    assert copies and all(c.startswith("--from=builder") for c in copies), \
        "the runtime gets the built venv, never the source tree or the build tools"


@pytest.mark.parametrize("stage", ["server", "trainer"])
def test_final_images_run_as_a_non_root_uid(stage: str):
    users = [args for ins, args in stage_instructions(stage) if ins == "USER"]
    assert users, f"{stage} runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, "numeric, so runAsNonRoot can verify it"


def test_dockerfile_health_check_entrypoint_and_ports():
    server = stage_instructions("server")
    (health,) = [args for ins, args in server if ins == "HEALTHCHECK"]
    assert "memstore health" in health and str(GRPC_PORT) in health
    (entrypoint,) = [json.loads(args) for ins, args in server if ins == "ENTRYPOINT"]
    assert entrypoint == ["memstore"]
    (cmd,) = [json.loads(args) for ins, args in server if ins == "CMD"]
    exposed = {int(p) for ins, args in server if ins == "EXPOSE" for p in args.split()}
    port = int(option_value(cmd, "port") or FIELDS["port"].default)
    assert exposed == {port, int(option_value(cmd, "metrics_port"))}
    assert option_value(cmd, "host") == "0.0.0.0" and option_value(cmd, "backend") == "lmdb"
    (volume,) = [json.loads(args) for ins, args in server if ins == "VOLUME"]
    assert volume == [option_value(cmd, "data_dir")]


def test_dockerfile_fetches_nothing_unpinned_by_url():
    for stage, ins, args in dockerfile_instructions():
        assert not (ins == "ADD" and re.search(r"https?://", args)), "ADD <url> is unverified"
        assert not re.search(r"(curl|wget)\b.*\|\s*(ba)?sh", args), "no piping downloads into a shell"


def test_server_image_installs_no_torch():
    # Run the builder's own requirements one-liner: the server deps are pyproject's minus torch.
    (run,) = [args for ins, args in stage_instructions("builder") if ins == "RUN" and "tomllib" in args]
    one_liner = re.match(r'python (-c ".*?")\s*>', run).group(1)
    result = subprocess.run(f"{shlex.quote(sys.executable)} {one_liner}", shell=True, cwd=ROOT,
                            capture_output=True, text=True, check=True)
    names = {re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower() for req in result.stdout.split()}
    assert "torch" not in names
    assert {"grpcio", "grpcio-health-checking", "protobuf", "lmdb", "numpy"} <= names
    for ins, args in stage_instructions("builder"):
        if ins == "RUN" and "pip install" in args and "requirements-server" not in args:
            assert "--no-deps" in args, f"`{args}` may pull torch into the server image"


def test_server_and_admin_commands_import_without_torch():
    # The server image has no torch, yet runs `memstore serve` and the admin commands (`memstore
    # snapshot`, `ls`, `health`), which use engram_client's gRPC client. Block torch and import them.
    code = ("import sys; sys.modules['torch'] = None\n"
            "import memstore.cli, memstore.server, engram_client.memstore_client")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False,
                            capture_output=True, text=True)
    assert result.returncode == 0, "the server image would fail without torch:\n" + result.stderr[-2000:]


def test_copied_paths_exist_and_pass_dockerignore():
    allowed = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for stage, ins, args in dockerfile_instructions():
        if ins != "COPY" or args.startswith("--from="):
            continue
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for source in sources:
            top = Path(source).parts[0]
            assert top in allowed, f"{stage}: COPY {source} is excluded by .dockerignore"
            assert (ROOT / source).exists(), f"{stage}: COPY {source}: no such path in the repo"

