"""Kubernetes objects as the checks see them: quantities, metadata, label selectors, and the pod
template of a workload with its ports."""

import re
from fractions import Fraction

import yaml



def load_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]


QUANTITY_SUFFIX = {
    "m": Fraction(1, 1000), "": Fraction(1), "k": Fraction(10**3), "M": Fraction(10**6),
    "G": Fraction(10**9), "T": Fraction(10**12), "P": Fraction(10**15), "E": Fraction(10**18),
    "Ki": Fraction(2**10), "Mi": Fraction(2**20), "Gi": Fraction(2**30), "Ti": Fraction(2**40),
    "Pi": Fraction(2**50), "Ei": Fraction(2**60),
}


def quantity(value):
    """A Kubernetes quantity ("2", "500m", "256Mi", 2) as a Fraction, or None."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?\s*", str(value))
    if not m:
        return None
    return Fraction(m.group(1)) * QUANTITY_SUFFIX[m.group(2) or ""]


def fmt_q(q):
    return f"{float(q):g}"


def meta(obj):
    return obj.get("metadata") or {}


def ns_of(obj):
    return meta(obj).get("namespace") or "default"


def ref(obj):
    return f"{obj.get('kind')} {ns_of(obj)}/{meta(obj).get('name')}"


def selector_matches(selector, labels):
    """A LabelSelector (matchLabels / matchExpressions) against a label map."""
    if selector is None:
        return False
    labels = labels or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def selector_empty(selector):
    return not (selector or {}).get("matchLabels") and not (selector or {}).get("matchExpressions")


WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"}


class Workload:
    """A pod template and where it comes from."""

    def __init__(self, obj):
        self.obj = obj
        self.name = meta(obj).get("name")
        self.namespace = ns_of(obj)
        template = (obj.get("spec") or {}).get("template") or {}
        self.labels = (template.get("metadata") or {}).get("labels") or {}
        self.annotations = (template.get("metadata") or {}).get("annotations") or {}
        self.pod = template.get("spec") or {}
        self.containers = self.pod.get("containers") or []

    def ports(self):
        """(container name, port name or None, number, protocol) of every container port."""
        for c in self.containers:
            for p in c.get("ports") or []:
                yield c.get("name"), p.get("name"), p.get("containerPort"), p.get("protocol", "TCP")

    def port_names(self):
        return {name for _, name, _, _ in self.ports() if name}

    def port_numbers(self):
        return {number for _, _, number, _ in self.ports()}

    def resolve(self, port):
        """A port given by number or name -> (name, number), or None if no container has it."""
        for _, name, number, _ in self.ports():
            if port == number or (isinstance(port, str) and port == name):
                return name, number
            if isinstance(port, str) and port.isdigit() and int(port) == number:
                return name, number
        return None

    def describe_ports(self):
        return ", ".join(f"{n or '?'}={num}" for _, n, num, _ in self.ports()) or "none"

