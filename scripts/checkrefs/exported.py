"""What the broker exports, read from the running binary: start it on free loopback ports,
wait for /readyz, scrape /metrics once, stop it with SIGTERM and require exit 0. The names
come from the `# TYPE` lines (a histogram is its _bucket, _sum and _count series) and the label
values from the samples, which the broker exports at zero from its start."""

import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

# How long the binary may take to become ready, and to exit after SIGTERM (it drains nothing).
READY_TIMEOUT = 10.0
EXIT_TIMEOUT = 10.0

SAMPLE_RE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+\S+")
LABEL_RE = re.compile(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"')


class ExportError(Exception):
    """The binary is missing, did not become ready, or did not stop cleanly."""


class Exported:
    """Series names and label values of one scrape."""

    def __init__(self, text):
        self.text = text
        self.names = set()
        self.histograms = set()
        self.labels = {}  # series name -> {label: {values}}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                parts = line.split()
                if len(parts) >= 4:
                    name, kind = parts[2], parts[3]
                    if kind == "histogram":
                        self.histograms.add(name)
                        self.names |= {name + "_bucket", name + "_sum", name + "_count"}
                    else:
                        self.names.add(name)
                continue
            m = SAMPLE_RE.match(line)
            if m and m.group(2):
                values = self.labels.setdefault(m.group(1), {})
                for label, value in LABEL_RE.findall(m.group(2)):
                    values.setdefault(label, set()).add(value)
        if not self.names:
            raise ExportError("the scrape has no `# TYPE` lines")

    def label_values(self, name, label):
        """The values `label` takes on series `name`, or None if the broker never sets it."""
        return (self.labels.get(name) or {}).get(label)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=1.0):
    """(status, body) or (None, reason) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (urllib.error.URLError, OSError) as e:
        return None, str(e)


def scrape_binary(binary):
    """Runs `binary` as a broker and returns its /metrics text (see the module doc)."""
    if not binary.is_file():
        raise ExportError(f"{binary} does not exist: build it first "
                          f"(cargo build --release -p broker --bin broker)")
    admin = f"127.0.0.1:{free_port()}"
    cmd = [str(binary), "--frontend", f"tcp://127.0.0.1:{free_port()}", "--admin", admin, "--workers", "1"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        status = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ExportError(f"{binary} exited {proc.returncode} before it was ready: "
                                  f"{proc.stderr.read().decode(errors='replace').strip()}")
            status, _ = http_get(f"http://{admin}/readyz")
            if status == 200:
                break
            time.sleep(0.05)  # polling /readyz until the deadline above
        if status != 200:
            raise ExportError(f"{binary}: /readyz not 200 within {READY_TIMEOUT:g} s (last: {status})")
        status, text = http_get(f"http://{admin}/metrics", timeout=5.0)
        if status != 200:
            raise ExportError(f"{binary}: GET /metrics answered {status}: {text}")
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise ExportError(f"{binary} did not exit within {EXIT_TIMEOUT:g} s of SIGTERM") from None
        if code != 0:
            raise ExportError(f"{binary} exited {code} after SIGTERM (want 0)")
        return text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
