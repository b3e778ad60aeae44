"""prometheus-adapter rules: which custom metrics a rule serves, and for which resources."""

import re

from .promql import promql_metrics


def adapter_rules(docs):
    """Every rule of prometheus-adapter Helm values (`rules.custom`) among `docs`."""
    out = []
    for doc in docs:
        rules = doc.get("rules") if "kind" not in doc else None
        if not isinstance(rules, dict):
            continue
        for rule in rules.get("custom") or []:
            if isinstance(rule, dict) and "seriesQuery" in rule:
                out.append(rule)
    return out


def adapter_served(rule):
    """Custom metric names a rule serves: `name.as` expanded on each series name it matches."""
    served = set()
    name = rule.get("name") or {}
    pattern = name.get("matches") or ".*"
    template = name.get("as")
    if template is None:
        template = "$1" if re.compile(pattern).groups == 1 else "$0"
    template = re.sub(r"\$\{(\w+)\}|\$(\d+)", lambda m: rf"\g<{m.group(1) or m.group(2)}>", template)
    for series in promql_metrics(rule.get("seriesQuery", "")):
        m = re.search(pattern, series)
        if m:
            served.add(m.expand(template))
    return served


def adapter_resources(rule):
    resources = rule.get("resources") or {}
    if resources.get("template"):
        return {"namespace", "pod", "node", "service", "deployment"}  # label = resource name
    return {
        (v or {}).get("resource")
        for v in (resources.get("overrides") or {}).values()
        if isinstance(v, dict)
    }

