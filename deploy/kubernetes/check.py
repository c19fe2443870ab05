#!/usr/bin/env python3
"""Checks the Kubernetes manifests in deploy/kubernetes/ against Kubernetes and against shardserve.

  python3 deploy/kubernetes/check.py --bin-dir target/debug [--pending NAME]...

1. Every manifest passes `kubernetes-validate --strict` for Kubernetes 1.30.0 and for the newest
   version the installed kubernetes-validate knows.
2. The manifests agree with deploy/compose.yaml and with the built binaries: images, the
   commands containers and hooks run (binary, `shardctl` subcommand, flags), the SHARDSERVE_*
   variables each binary reads, and the SHARDSERVE_* names Compose sets.
3. Each overlay (a kustomization that no other one uses) holds together: ConfigMap keys, claims,
   Services, selectors, RBAC and the fleet size refer to objects it has.

Overlays are rendered here rather than by kustomize: a kustomization may list `resources:` and
nothing else, so an overlay is exactly the objects of the files it lists. `--pending NAME` skips an
environment variable, flag or `shardctl` subcommand that is written in the manifests before it is
in the binaries (each skip is printed). Needs PyYAML and kubernetes-validate; uses no network.
Exits 1 naming the manifest and field of every problem.
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
COMPOSE = ROOT / "deploy" / "compose.yaml"

OLDEST_KUBERNETES = "1.30.0"
SHARDSERVE_IMAGES = {"shardserve:latest", "shardserve:cuda"}
GPU_IMAGE = "shardserve:cuda"
BINARIES = {"coordinator", "worker", "shardctl"}
NONROOT_UID = 65532

# SHARDSERVE_* names in deploy/compose.yaml that the manifests need not set, and why.
COMPOSE_ONLY = {
    "SHARDSERVE_IMAGE": "a variable of `docker compose` choosing the image; the manifests name theirs",
}

# Kinds whose objects hold a pod template, and where it is.
POD_SPEC_PATHS = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}

problems = []


def problem(where, message):
    # Objects of the base are checked once in each overlay: say each thing once.
    if f"{where}: {message}" not in problems:
        problems.append(f"{where}: {message}")


def rel(path):
    return os.path.relpath(path, ROOT)


def dig(obj, *keys):
    for k in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(k)
    return obj


# ---- rendering the overlays -------------------------------------------------------------------


class Doc:
    """One object of a manifest file."""

    def __init__(self, path, obj):
        self.path, self.obj = path, obj
        self.kind = obj.get("kind", "?")
        self.name = dig(obj, "metadata", "name") or "?"

    def where(self, field=""):
        return f"{rel(self.path)} {self.kind}/{self.name}" + (f" {field}" if field else "")


def load_docs(path):
    with open(path) as f:
        return [Doc(path, d) for d in yaml.safe_load_all(f) if d]


def render(directory, stack=()):
    """The files and objects of the kustomization in `directory`, resources and all."""
    kfile = directory / "kustomization.yaml"
    if directory in stack:
        problem(rel(kfile), "resources include themselves")
        return [], []
    with open(kfile) as f:
        k = yaml.safe_load(f) or {}
    extra = set(k) - {"apiVersion", "kind", "resources"}
    if extra:
        problem(rel(kfile), f"uses {', '.join(sorted(extra))}: check.py renders `resources:` only, so "
                "write the objects out in full in the overlay's files instead")
    files, docs = [], []
    for r in k.get("resources") or []:
        p = (directory / r).resolve()
        if p.is_dir():
            if not (p / "kustomization.yaml").is_file():
                problem(rel(kfile), f"resources: {r} is a folder without a kustomization.yaml")
                continue
            f, d = render(p, stack + (directory,))
            files += f
            docs += d
        elif p.is_file():
            files.append(p)
            docs += load_docs(p)
        else:
            problem(rel(kfile), f"resources: {r} does not exist")
    return files, docs


def overlays():
    """{overlay folder: (files, objects)} for every kustomization no other one lists."""
    dirs = sorted(p.parent for p in HERE.rglob("kustomization.yaml"))
    used = set()
    for d in dirs:
        with open(d / "kustomization.yaml") as f:
            for r in (yaml.safe_load(f) or {}).get("resources") or []:
                used.add((d / r).resolve())
    out = {d: render(d) for d in dirs if d.resolve() not in used}
    listed = {f for files, _ in out.values() for f in files}
    for p in sorted(list(HERE.rglob("*.yaml")) + list(HERE.rglob("*.yml"))):
        if p.name != "kustomization.yaml" and p.resolve() not in listed:
            problem(rel(p), "no overlay lists this file, so nothing applies or checks it")
    for d, (_, docs) in out.items():
        seen = {}
        for doc in docs:
            key = (doc.kind, doc.name)
            if key in seen:
                problem(doc.where(), f"also defined in {rel(seen[key])}: overlay {rel(d)} has it twice")
            seen[key] = doc.path
    return out


# ---- kubernetes-validate ----------------------------------------------------------------------


def newest_kubernetes():
    """The newest Kubernetes version with strict schemas in the installed kubernetes-validate."""
    import kubernetes_validate

    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    versions = [m.group(1) for p in schemas.iterdir()
                if (m := re.fullmatch(r"v(\d+\.\d+\.\d+)-local-strict", p.name))]
    if f"v{OLDEST_KUBERNETES}-local-strict" not in {p.name for p in schemas.iterdir()}:
        problem("kubernetes-validate", f"the installed version has no schemas for Kubernetes {OLDEST_KUBERNETES}")
    return max(versions, key=lambda v: tuple(int(x) for x in v.split(".")))


def validate(files):
    try:
        newest = newest_kubernetes()
    except ImportError:
        problem("kubernetes-validate", f"not installed for {sys.executable}: run check.py with the Python of a "
                "virtual environment that has it (python3 -m venv target/deploy-venv && "
                "target/deploy-venv/bin/pip install kubernetes-validate pyyaml)")
        return
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet",
           "-k", OLDEST_KUBERNETES, "-k", newest] + [str(f) for f in files]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    out = (run.stdout + run.stderr).strip()
    # A kind without a schema is only a warning to kubernetes-validate: here it fails, since it
    # means the object was not checked at all.
    bad = [line for line in out.splitlines() if line.startswith(("ERROR", "WARN", "FATAL"))]
    if run.returncode != 0 or bad:
        shown = "\n    ".join(bad or out.splitlines())
        problem("kubernetes-validate --strict", f"failed (exit {run.returncode}):\n    {shown}")
    else:
        print(f"ok: kubernetes-validate --strict passes {len(files)} files "
              f"for Kubernetes {OLDEST_KUBERNETES} and {newest}")


# ---- the binaries' --help ---------------------------------------------------------------------


class Binaries:
    def __init__(self, bin_dir, pending):
        self.bin_dir, self.pending = bin_dir, pending
        self.cache = {}
        self.skipped = set()
        self.pending_seen = set()

    def help(self, path):
        """`--help` of a binary or subcommand path, e.g. ("shardctl", "drain"); None if it has none."""
        if path not in self.cache:
            exe = self.bin_dir / path[0]
            if not exe.is_file():
                problem(str(self.bin_dir), f"has no `{path[0]}` binary (build them: cargo build --bins)")
                self.cache[path] = None
            else:
                # Set variables would show up in the help as their values; leave them out.
                env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDSERVE_")}
                run = subprocess.run([str(exe), *path[1:], "--help"], capture_output=True, text=True,
                                     timeout=60, env=env)
                if run.returncode != 0:
                    problem(" ".join(path) + " --help", f"exited with {run.returncode}: {run.stderr.strip()}")
                self.cache[path] = run.stdout if run.returncode == 0 else None
        return self.cache[path]

    @staticmethod
    def subcommands(text):
        m = re.search(r"^Commands:\n((?:  .*\n?)+)", text, re.M)
        return {line.split()[0] for line in m.group(1).splitlines() if line.strip()} - {"help"} if m else set()

    @staticmethod
    def flags(text):
        return set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", text))

    @staticmethod
    def env_names(text):
        return set(re.findall(r"\[env: ([A-Z0-9_]+)=", text))

    def skip(self, name, where, shown=None):
        self.pending_seen.add(name)
        self.skipped.add(f"{shown or name} ({where})")

    def invocation(self, argv, where):
        """Checks `argv` (binary, subcommands, flags); returns the command it runs ("shardctl
        drain") and that command's --help, or None when it cannot be checked."""
        binary = argv[0]
        if binary not in BINARIES:
            problem(where, f"runs `{binary}`, which is none of shardserve's binaries ({', '.join(sorted(BINARIES))})")
            return None
        path = (binary,)
        text = self.help(path)
        rest = list(argv[1:])
        if binary == "shardctl":
            while text is not None:
                subs = self.subcommands(text)
                if not subs:
                    break
                if not rest or rest[0].startswith("-"):
                    problem(where, f"`{' '.join(path)}` needs a subcommand (one of {', '.join(sorted(subs))})")
                    return None
                if rest[0] not in subs:
                    waited = [p for k in range(1, len(rest) + 1)
                              if (p := " ".join(path[1:] + tuple(rest[:k]))) in self.pending]
                    if waited:
                        self.skip(waited[-1], where, shown=f"shardctl {waited[-1]}")
                    else:
                        problem(where, f"`{' '.join(path + (rest[0],))}` does not exist "
                                f"(`{' '.join(path)} --help` lists {', '.join(sorted(subs))})")
                    return None
                path += (rest.pop(0),)
                text = self.help(path)
        if text is None:
            return None
        known = self.flags(text)
        for flag in (tok.split("=", 1)[0] for tok in rest if tok.startswith("--")):
            if flag in known:
                continue
            if flag in self.pending:
                self.skip(flag, where)
            else:
                problem(where, f"`{flag}` is not a flag of `{' '.join(path)}` (see its --help)")
        return " ".join(path), text


# ---- pod specs --------------------------------------------------------------------------------

VAR_REF = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def pod_spec(doc):
    keys = POD_SPEC_PATHS.get(doc.kind)
    spec = dig(doc.obj, *keys) if keys else None
    return (spec, ".".join(keys)) if isinstance(spec, dict) else (None, None)


def env_value(entry, configmaps):
    """The value an env entry gets, where the overlay says it (literal or ConfigMap)."""
    if "value" in entry:
        return str(entry["value"])
    ref = dig(entry, "valueFrom", "configMapKeyRef")
    return (configmaps.get(ref.get("name")) or {}).get(ref.get("key")) if ref else None


def env_names(container, configmaps):
    names = [e["name"] for e in container.get("env") or []]
    for src in container.get("envFrom") or []:
        ref = src.get("configMapRef")
        if ref:
            names += [src.get("prefix", "") + k for k in configmaps.get(ref.get("name")) or {}]
    return names


def check_var_refs(c, where):
    """`$(VAR)` is expanded only from variables defined before it; an unknown one stays literal."""
    defined = []
    for e in c.get("env") or []:
        for var in VAR_REF.findall(str(e.get("value", ""))):
            if var not in defined:
                problem(where, f"env {e['name']} uses $({var}), which no earlier env entry defines (it stays literal)")
        defined.append(e["name"])
    for field in ("command", "args"):
        for var in VAR_REF.findall(" ".join(str(t) for t in c.get(field) or [])):
            if var not in defined:
                problem(where, f"{field} uses $({var}), which the container's env does not define")


def shell_commands(argv):
    """The commands an exec handler runs, and its script: itself, or each simple command of
    `sh -c SCRIPT` (without a leading `exec`)."""
    if len(argv) < 3 or os.path.basename(argv[0]) not in ("sh", "bash") or argv[1] != "-c":
        return [argv], ""
    lexer = shlex.shlex(argv[2], posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    cmds = [[]]
    for tok in lexer:
        if tok and set(tok) <= set(";&|"):
            cmds.append([])
        else:
            cmds[-1].append(tok)
    return [c[1:] if c[0] == "exec" else c for c in cmds if c], argv[2]


def check_security(spec, c, where_pod, where):
    pod_sc, sc = spec.get("securityContext") or {}, c.get("securityContext") or {}
    if pod_sc.get("runAsNonRoot") is not True or pod_sc.get("runAsUser") != NONROOT_UID:
        problem(where_pod, f"securityContext must set runAsNonRoot: true and runAsUser: {NONROOT_UID}")
    if dig(pod_sc, "seccompProfile", "type") != "RuntimeDefault":
        problem(where_pod, "securityContext.seccompProfile.type must be RuntimeDefault")
    wanted = {"runAsNonRoot": True, "runAsUser": NONROOT_UID, "readOnlyRootFilesystem": True,
              "allowPrivilegeEscalation": False}
    for key, value in wanted.items():
        if sc.get(key) != value:
            problem(where, f"securityContext.{key} must be {str(value).lower()}")
    if "ALL" not in (dig(sc, "capabilities", "drop") or []):
        problem(where, "securityContext.capabilities.drop must include ALL")
    if dig(sc, "seccompProfile", "type") != "RuntimeDefault":
        problem(where, "securityContext.seccompProfile.type must be RuntimeDefault")
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    tmp = [m["name"] for m in c.get("volumeMounts") or [] if m.get("mountPath") == "/tmp"]
    if not tmp or "emptyDir" not in volumes.get(tmp[0], {}):
        problem(where, "the root filesystem is read-only: mount an emptyDir at /tmp")


def compose_default(value):
    """The default of a Compose value such as `${SHARDSERVE_IMAGE:-shardserve:latest}`."""
    m = re.fullmatch(r"\$\{[A-Za-z0-9_]+:?-([^}]*)\}", str(value))
    return m.group(1) if m else str(value)


class Overlay:
    """The objects of one overlay, and the checks that need all of them."""

    def __init__(self, directory, docs, bins, compose):
        self.directory, self.docs, self.bins, self.compose = directory, docs, bins, compose
        self.configmaps = {d.name: d.obj.get("data") or {} for d in docs if d.kind == "ConfigMap"}
        self.by_kind = {}
        for d in docs:
            self.by_kind.setdefault(d.kind, {})[d.name] = d
        self.templates = []  # (labels, doc) of every pod template
        self.component_env = {"coordinator": set(), "worker": set()}
        self.fleet = {}  # what the coordinator reads, for the fleet checks

    def has(self, kind, name):
        return name in self.by_kind.get(kind, {})

    def check(self):
        for doc in self.docs:
            spec, base = pod_spec(doc)
            if spec is None:
                continue
            labels = dig(doc.obj, *POD_SPEC_PATHS[doc.kind][:-1], "metadata", "labels") or {}
            self.templates.append((labels, doc))
            sa = spec.get("serviceAccountName")
            if sa and sa != "default" and not self.has("ServiceAccount", sa):
                problem(doc.where(f"{base}.serviceAccountName"), f"no ServiceAccount {sa} in {rel(self.directory)}")
            for v in spec.get("volumes") or []:
                claim = dig(v, "persistentVolumeClaim", "claimName")
                if claim and not self.has("PersistentVolumeClaim", claim):
                    problem(doc.where(f"{base}.volumes[{v['name']}]"),
                            f"no PersistentVolumeClaim {claim} in {rel(self.directory)}")
            for group in ("initContainers", "containers"):
                for c in spec.get(group) or []:
                    self.container(doc, spec, c, f"{base}.{group}[{c.get('name')}]")
        self.selectors()
        self.scaling()
        self.compose_env()

    def container(self, doc, spec, c, cpath):
        where = doc.where(cpath)
        check_security(spec, c, doc.where(pod_spec(doc)[1]), where)
        check_var_refs(c, where)
        for e in c.get("env") or []:
            ref = dig(e, "valueFrom", "configMapKeyRef")
            if ref and not ref.get("optional"):
                if ref.get("name") not in self.configmaps:
                    problem(f"{where}.env[{e['name']}]", f"no ConfigMap {ref.get('name')} in {rel(self.directory)}")
                elif ref.get("key") not in self.configmaps[ref["name"]]:
                    problem(f"{where}.env[{e['name']}]", f"ConfigMap {ref['name']} has no key {ref.get('key')}")
        if not self.image(c, where):
            return
        if c.get("command"):
            problem(f"{where}.command", "replaces the image's entrypoint (tini, which forwards signals as PID 1): "
                    "give the binary and its arguments in args")
        argv = [str(a) for a in c.get("args") or []]
        if not argv:
            problem(f"{where}.args", "names no binary (the image's default command only prints --help)")
            return
        names = env_names(c, self.configmaps)
        self.component_env.get(argv[0], set()).update(names)
        checked = self.bins.invocation(argv, f"{where}.args")
        if checked:
            path, text = checked
            known = self.bins.env_names(text)
            for n in names:
                if n.startswith("SHARDSERVE_") and n not in known:
                    if n in self.bins.pending:
                        self.bins.skip(n, f"{where}.env")
                    else:
                        problem(f"{where}.env[{n}]", f"`{path} --help` has no [env: {n}]")
        envs = {e["name"]: env_value(e, self.configmaps) for e in c.get("env") or []}
        gpus = dig(c, "resources", "limits", "nvidia.com/gpu")
        if gpus and not str(envs.get("SHARDSERVE_DEVICE")).startswith("cuda"):
            problem(f"{where}.env[SHARDSERVE_DEVICE]", "a container given a GPU must run on it (cuda)")
        if "HF_HUB_CACHE" in envs:
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
            volume = {v["name"]: v for v in spec.get("volumes") or []}.get(mounts.get(envs["HF_HUB_CACHE"]), {})
            if "persistentVolumeClaim" not in volume:
                problem(f"{where}.env[HF_HUB_CACHE]", f"{envs['HF_HUB_CACHE']} is not a mounted PersistentVolumeClaim")
        for url in coordinator_urls(argv):
            self.url(url, f"{where}.args")
        drains = self.hooks(c, where)
        if argv[0] == "coordinator":
            self.fleet.update(envs, where=where, sa=spec.get("serviceAccountName"))
        if argv[0] == "worker":
            self.worker(doc, spec, where, envs, drains)

    def image(self, c, where):
        """Checks the image; True when it is shardserve's (so its command is checked too)."""
        image = str(c.get("image", ""))
        gpus = dig(c, "resources", "limits", "nvidia.com/gpu")
        if not image.startswith("shardserve"):
            etcd = compose_default(self.compose["services"]["etcd"]["image"])
            if image != etcd:
                problem(f"{where}.image", f"{image} is neither a shardserve image nor Compose's etcd ({etcd})")
            return False
        cpu = compose_default(self.compose["x-shardserve"]["image"])
        if image not in SHARDSERVE_IMAGES:
            problem(f"{where}.image", f"{image} is not one of {', '.join(sorted(SHARDSERVE_IMAGES))}")
        elif image != GPU_IMAGE and image != cpu:
            problem(f"{where}.image", f"{image} differs from {rel(COMPOSE)}'s default image {cpu}")
        if (image == GPU_IMAGE) != bool(gpus):
            problem(f"{where}.image", f"{image} with {gpus or 'no'} nvidia.com/gpu: the CUDA image is for the "
                    "containers that ask for a GPU, and only for them")
        return True

    def hooks(self, c, where):
        """Checks the lifecycle hooks' commands; returns the `shardctl drain` ones of preStop."""
        drains = []
        for hook in ("postStart", "preStop"):
            argv = [str(a) for a in dig(c, "lifecycle", hook, "exec", "command") or []]
            hwhere = f"{where}.lifecycle.{hook}.exec.command"
            if not argv:
                continue
            if any("$(" in a for a in argv):
                problem(hwhere, "the kubelet does not expand $(VAR) in lifecycle hooks: run it through /bin/sh -c")
            commands, script = shell_commands(argv)
            defined = set(env_names(c, self.configmaps)) | {"HOSTNAME", "HOME", "PATH"}
            for var in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", script):
                if var not in defined:
                    problem(hwhere, f"the script uses ${var}, which the container's env does not define")
            for cmd in commands:
                if cmd[0] in BINARIES:
                    self.bins.invocation(cmd, hwhere)
                    for url in coordinator_urls(cmd):
                        self.url(url, hwhere)
                    if hook == "preStop" and cmd[:2] == ["shardctl", "drain"]:
                        drains.append(cmd)
        return drains

    def worker(self, doc, spec, where, envs, drains):
        listen, advertise = envs.get("SHARDSERVE_WORKER_LISTEN") or "", envs.get("SHARDSERVE_WORKER_ADVERTISE") or ""
        if listen.rpartition(":")[2] != advertise.rpartition(":")[2]:
            problem(f"{where}.env", f"SHARDSERVE_WORKER_ADVERTISE {advertise} is not the port it listens on ({listen})")
        if doc.kind == "StatefulSet":
            service = dig(doc.obj, "spec", "serviceName")
            svc = self.by_kind.get("Service", {}).get(service)
            if svc is None or dig(svc.obj, "spec", "clusterIP") != "None":
                problem(doc.where("spec.serviceName"), f"{service} is not a headless Service of {rel(self.directory)}")
            if f".{service}." not in advertise:
                problem(f"{where}.env[SHARDSERVE_WORKER_ADVERTISE]",
                        f"{advertise} is not a name under Service {service}")
        if not drains:
            problem(f"{where}.lifecycle.preStop", "a worker must be drained (`shardctl drain`) before it stops")
        grace = spec.get("terminationGracePeriodSeconds", 30)
        for cmd in drains:
            timeout = int(next((cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == "--timeout-s"), 60))
            if grace <= timeout:
                problem(doc.where(f"{pod_spec(doc)[1]}.terminationGracePeriodSeconds"),
                        f"{grace} s does not cover the preStop drain's --timeout-s {timeout}")

    def url(self, url, where):
        """A URL naming a Service of the overlay names one that exists, on one of its ports."""
        m = re.fullmatch(r"https?://([a-z0-9-]+)(?:\.[a-z0-9.-]+)?:(\d+)/?", url)
        if not m:
            return
        svc = self.by_kind.get("Service", {}).get(m.group(1))
        if svc is None:
            problem(where, f"{url}: no Service {m.group(1)} in {rel(self.directory)}")
        elif int(m.group(2)) not in [p.get("port") for p in dig(svc.obj, "spec", "ports") or []]:
            problem(where, f"{url}: Service {m.group(1)} has no port {m.group(2)}")

    def selectors(self):
        """Every selector of a Service, budget, policy or controller selects a pod of the overlay."""
        def selects(selector):
            return any(all(labels.get(k) == v for k, v in selector.items()) for labels, _ in self.templates)

        for doc in self.docs:
            spec = doc.obj.get("spec") or {}
            found = []
            if doc.kind == "Service":
                found.append(("spec.selector", spec.get("selector")))
            elif doc.kind == "NetworkPolicy":
                found.append(("spec.podSelector.matchLabels", dig(spec, "podSelector", "matchLabels")))
                for i, rule in enumerate(spec.get("ingress") or []):
                    for j, peer in enumerate(rule.get("from") or []):
                        found.append((f"spec.ingress[{i}].from[{j}].podSelector.matchLabels",
                                      dig(peer, "podSelector", "matchLabels")))
            elif doc.kind in ("PodDisruptionBudget", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
                found.append(("spec.selector.matchLabels", dig(spec, "selector", "matchLabels")))
            for field, selector in found:
                if selector and not selects(selector):
                    problem(doc.where(field), f"{selector} selects no pod of {rel(self.directory)}")

    def scaling(self):
        """The coordinator's worker StatefulSet exists, the coordinator may scale it, and it
        starts at least the workers the coordinators wait for."""
        name, where = self.fleet.get("SHARDSERVE_STATEFULSET"), self.fleet.get("where")
        if not name:
            return
        sts = self.by_kind.get("StatefulSet", {}).get(name)
        if sts is None:
            problem(f"{where}.env[SHARDSERVE_STATEFULSET]", f"no StatefulSet {name} in {rel(self.directory)}")
            return
        roles = {b.obj["roleRef"]["name"] for b in self.by_kind.get("RoleBinding", {}).values()
                 if {"kind": "ServiceAccount", "name": self.fleet["sa"]} in b.obj.get("subjects") or []}
        rules = [r for role in roles if self.has("Role", role)
                 for r in self.by_kind["Role"][role].obj.get("rules") or []]
        if not any("apps" in r.get("apiGroups", []) and "statefulsets/scale" in r.get("resources", [])
                   and "patch" in r.get("verbs", []) and name in r.get("resourceNames", [name]) for r in rules):
            problem(f"{where}.env[SHARDSERVE_STATEFULSET]",
                    f"ServiceAccount {self.fleet['sa']} may not patch statefulsets/scale of {name}")
        try:
            workers, tp = int(self.fleet.get("SHARDSERVE_WORKERS") or 1), int(self.fleet.get("SHARDSERVE_TP") or 1)
        except ValueError:
            problem(f"{where}.env", "SHARDSERVE_WORKERS and SHARDSERVE_TP must be numbers")
            return
        replicas = dig(sts.obj, "spec", "replicas")
        if replicas is not None and replicas < workers:
            problem(sts.where("spec.replicas"), f"{replicas}, but the coordinators wait for {workers} workers")
        if workers % tp:
            problem(f"{where}.env[SHARDSERVE_TP]", f"{workers} workers do not make whole groups of {tp}")

    def compose_env(self):
        """What Compose sets for a coordinator or a worker, the overlay's pods set too."""
        for service, definition in self.compose["services"].items():
            # `command: [coordinator]`, or `sh -c 'exec coordinator ...'`.
            commands, _ = shell_commands([str(a) for a in definition.get("command") or []])
            component = commands[0][0] if commands and commands[0] else None
            if component not in self.component_env:
                continue
            for n in definition.get("environment") or {}:
                if n.startswith("SHARDSERVE_") and n not in self.component_env[component] and n not in COMPOSE_ONLY:
                    problem(f"{rel(COMPOSE)} services.{service}.environment.{n}",
                            f"no {component} container of {rel(self.directory)} sets it "
                            "(set it there, or list it in check.py's COMPOSE_ONLY with why)")


def coordinator_urls(argv):
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--coordinator"] + \
        [a.split("=", 1)[1] for a in argv if a.startswith("--coordinator=")]


def check_compose_names(compose_text, compose):
    """Every SHARDSERVE_* name in compose.yaml is a service's environment or documented here."""
    env_keys = {n for s in compose["services"].values() for n in (s.get("environment") or {})}
    for n in sorted(set(re.findall(r"SHARDSERVE_[A-Z0-9_]+", compose_text)) - env_keys - set(COMPOSE_ONLY)):
        problem(rel(COMPOSE), f"{n} is used but is no service's environment "
                "(list it in check.py's COMPOSE_ONLY with why)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", required=True, type=Path, help="where the built coordinator, worker and shardctl are")
    ap.add_argument("--pending", action="append", default=[], metavar="NAME",
                    help="an env name, flag or shardctl subcommand (`cache fill`) not in the binaries yet")
    args = ap.parse_args()
    pending = {p.removeprefix("shardctl ").strip() for p in args.pending}
    bins = Binaries(args.bin_dir.resolve(), pending)

    rendered = overlays()
    files = sorted({f for fs, _ in rendered.values() for f in fs})
    validate(files)

    compose_text = COMPOSE.read_text()
    compose = yaml.safe_load(compose_text)
    check_compose_names(compose_text, compose)
    before = len(problems)
    for directory, (_, docs) in rendered.items():
        Overlay(directory, docs, bins, compose).check()
    if len(problems) == before:
        print(f"ok: overlays {', '.join(rel(d) for d in rendered)} agree with {rel(COMPOSE)} "
              f"and the binaries in {args.bin_dir}")

    for s in sorted(bins.skipped):
        print(f"skipped (pending): {s}")
    for p in sorted(pending - bins.pending_seen):
        print(f"note: --pending {p} was not needed: the binaries have it, or no manifest uses it")
    if problems:
        print(f"\ncheck.py: {len(problems)} problem(s) in deploy/kubernetes/:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
