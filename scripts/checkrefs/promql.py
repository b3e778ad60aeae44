"""PromQL, just enough to find the metric names and label matchers of an expression."""

import re

import yaml


PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan", "start", "end", "atan2",
    # Aggregation operators may be followed by `by (...)` before their parentheses.
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}
STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
MATCHER_RE = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')')


def promql_metrics(expr):
    """Metric names an expression selects (adapter <<templates>> allowed)."""
    text = re.sub(r"<<[^>]*>>", "", expr)
    text = STRING_RE.sub('""', text)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r" \1 ", text)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", text):
        word = m.group(1)
        if word.lower() not in PROMQL_KEYWORDS:
            names.add(word)
    return names


def promql_selectors(expr):
    """(metric name or None, {label: (op, value)}) for every vector selector with matchers."""
    text = re.sub(r"<<[^>]*>>", "", expr)
    out = []
    block = r"""\{((?:[^{}"']|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')*)\}"""
    for m in re.finditer(r"([a-zA-Z_:][\w:]*)?\s*" + block, text):
        matchers = {}
        for lm in MATCHER_RE.finditer(m.group(2)):
            quoted = lm.group(3)
            value = yaml.safe_load(quoted) if quoted[0] == '"' else quoted[1:-1]
            matchers[lm.group(1)] = (lm.group(2), value)
        out.append((m.group(1), matchers))
    return out


def matcher_accepts(op, value, actual):
    if op == "=":
        return actual == value
    if op == "!=":
        return actual != value
    if op == "=~":
        return re.fullmatch(value, actual) is not None
    return re.fullmatch(value, actual) is None

