"""Prometheus relabelling and pod-role discovery, for a scrape config used without the operator."""

import re


def go_expand_template(template):
    """A Go regexp template ($1, ${1}, $name) as a Python one (\\g<1>)."""
    out = re.sub(r"\\", r"\\\\", template)
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: rf"\g<{m.group(1) or m.group(2)}>", out)


def relabel(labels, configs):
    """Applies relabel_configs as Prometheus does; None when the target is dropped."""
    labels = dict(labels)
    for cfg in configs or []:
        action = cfg.get("action", "replace").lower()
        regex = re.compile(cfg.get("regex", "(.*)"))
        value = cfg.get("separator", ";").join(labels.get(l, "") for l in cfg.get("source_labels") or [])
        if action == "keep" and not regex.fullmatch(value):
            return None
        if action == "drop" and regex.fullmatch(value):
            return None
        if action == "replace":
            m = regex.fullmatch(value)
            if m:
                target = m.expand(go_expand_template(cfg.get("target_label", "")))
                result = m.expand(go_expand_template(str(cfg.get("replacement", "$1"))))
                if result:
                    labels[target] = result
                else:
                    labels.pop(target, None)
        elif action in ("lowercase", "uppercase"):
            labels[cfg["target_label"]] = value.lower() if action == "lowercase" else value.upper()
        elif action == "labelmap":
            for name, v in list(labels.items()):
                m = regex.fullmatch(name)
                if m:
                    labels[m.expand(go_expand_template(str(cfg.get("replacement", "$1"))))] = v
        elif action == "labeldrop":
            labels = {k: v for k, v in labels.items() if not regex.fullmatch(k)}
        elif action == "labelkeep":
            labels = {k: v for k, v in labels.items() if regex.fullmatch(k)}
        elif action not in ("keep", "drop"):
            raise ValueError(f"relabel action {action} is not simulated")
    return labels


def sanitize(name):
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_targets(wl, pod_name, ip):
    """The targets Prometheus's pod-role discovery makes for one pod: one per container port."""
    base = {
        "__meta_kubernetes_namespace": wl.namespace,
        "__meta_kubernetes_pod_name": pod_name,
        "__meta_kubernetes_pod_ip": ip,
        "__meta_kubernetes_pod_ready": "true",
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_controller_kind": "ReplicaSet",
    }
    for k, v in wl.labels.items():
        base[f"__meta_kubernetes_pod_label_{sanitize(k)}"] = str(v)
        base[f"__meta_kubernetes_pod_labelpresent_{sanitize(k)}"] = "true"
    for k, v in wl.annotations.items():
        base[f"__meta_kubernetes_pod_annotation_{sanitize(k)}"] = str(v)
        base[f"__meta_kubernetes_pod_annotationpresent_{sanitize(k)}"] = "true"
    host = f"[{ip}]" if ":" in ip else ip
    for container_name, port_name, number, protocol in wl.ports():
        yield dict(base, **{
            "__address__": f"{host}:{number}",
            "__meta_kubernetes_pod_container_name": container_name or "",
            "__meta_kubernetes_pod_container_port_name": port_name or "",
            "__meta_kubernetes_pod_container_port_number": str(number),
            "__meta_kubernetes_pod_container_port_protocol": protocol,
        })

