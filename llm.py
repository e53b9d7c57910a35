"""
The OpenAI-compatible chat-completions client of distill.py: which servers reports may go to, the API key, the
requests in flight and the retries. It knows nothing of reports or labels, so any stage that asks an LLM could use it
as it is, and distill.py reads as the labelling story (prompt, answers, cache, outputs) without the HTTP plumbing.

    on_site         is an --api-base on this site's network? (reports are patient data; judged without a lookup)
    request_headers, redact   the key from OPENAI_API_KEY, read here only and cut out of any text that is shown or kept
    Gate            requests in flight and the timeout, backed off together when the server falls behind
    post            one POST with retries, backoff and Retry-After; Failed when retrying cannot help or is used up
    check_server    GET <api-base>/models once: is anything there, is the key taken, is --model listed?
"""
import contextlib
import ipaddress
import os
import random
import re
import socket
import threading
import time

import requests
from tqdm import tqdm
from urllib3.util import parse_url

from data import DataError, UsageError, require

class Failed(Exception):
    """A request that cannot succeed: refused in a way retrying cannot help, or out of retries. The message is the
    reason (distill.py writes it to failures.csv for the report that could not be labelled)."""
    def __init__(self, message, format_refused=False):
        super().__init__(message)
        self.format_refused = format_refused  # the server rejected the request's response_format

API_KEY = os.environ.get("OPENAI_API_KEY", "")  # from the environment only: a flag would land in shell history and ps

def redact(s):
    return s.replace(API_KEY, "[REDACTED]") if API_KEY else s  # servers may echo headers in error text

def request_headers():
    return {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {API_KEY}"} if API_KEY else {})

ON_SITE_SUFFIXES = (".local", ".internal", ".lan", ".home.arpa", ".localhost")  # mDNS, private-use and loopback names

def on_site(url):
    """Is the server at url on this site's network? Judged from the URL as written, never looked up: a lookup needs the
    network, and tests and air-gapped sites have none. IP literals: loopback, private (10/8, 172.16/12, 192.168/16,
    fc00::/7) or link-local. Names: localhost, a name without a dot (a LAN host, a container) or one under
    ON_SITE_SUFFIXES. Everything else (api.openai.com, gpu1.hospital.org) is off site: --allow-remote-api lets it through.
    A URL that is not http(s)://host...: UsageError."""
    try:  # urllib3's parser: the host it gives is the host requests will connect to
        u = parse_url(url)
        host = (u.host or "").strip("[]").rstrip(".").split("%")[0]  # [::1] -> ::1; fe80::1%eth0 -> fe80::1
    except ValueError:  # LocationParseError (a bad port, say) is a ValueError
        host, u = "", None
    if not u or u.scheme not in ("http", "https") or not host:
        raise UsageError(f"--api-base {url!r}: not an http(s) URL such as http://localhost:8000/v1")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:  # the resolver also reads 2130706433, 0x7f000001 and 127.1 as IPv4 addresses: so must we
            ip = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return "." not in host or host == "localhost" or host.endswith(ON_SITE_SUFFIXES)
    ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:8.8.8.8 is 8.8.8.8 (Python < 3.11.4 calls it private)
    return ip.is_loopback or ip.is_private or ip.is_link_local

class Gate:
    """Requests in flight and the wait for an answer, shared by the worker threads; timed_out() is the policy."""

    def __init__(self, limit, timeout):
        self.limit, self.timeout, self.cap, self.setting, self.timeouts = max(1, limit), timeout, 8 * timeout, 0, 0
        self.in_flight, self.cond, self.show = 0, threading.Condition(), lambda: None  # show: refresh the progress bar

    @contextlib.contextmanager
    def slot(self):  # -> (setting, timeout) that the request is sent under
        with self.cond:
            self.cond.wait_for(lambda: self.in_flight < self.limit)
            self.in_flight += 1
            ticket = (self.setting, self.timeout)
        try:
            yield ticket
        finally:
            with self.cond:
                self.in_flight -= 1
                self.cond.notify_all()

    def timed_out(self, ticket):
        """A timeout is news about the server, acted on once per setting: the first under the current setting halves the
        requests in flight (a server generating one answer at a time, llama.cpp's default, queues the rest); at one in
        flight it doubles the timeout (up to 8x) and counts as a try (-> True). One sent under an older setting is resent,
        uncounted. So timeouts use up no tries while something is left to back off: a slow server costs time, not reports.
        The limit never grows back in a run: each timeout leaves the server generating an answer nobody reads."""
        with self.cond:
            self.timeouts += 1
            fresh = ticket[0] == self.setting  # else it was sent before the last back-off: its timeout is no news
            alone = fresh and self.limit == 1
            if fresh:
                self.setting, self.limit = self.setting + 1, max(1, self.limit // 2)
                self.timeout = min(2 * self.timeout, self.cap) if alone else self.timeout
                tqdm.write(f"timeout: no answer in {ticket[1]:g} s; now at most {self.limit} in flight, waiting up to "
                           f"{self.timeout:g} s (the server is slower than --timeout, or serves fewer at once than "
                           f"--concurrency): try --concurrency {self.limit} --timeout {self.timeout:g}")
            self.show()  # the progress bar's timeouts= as they happen, not at the next answer
        return alone

local = threading.local()  # one requests.Session (keep-alive pool) per worker thread

def post(url, headers, body, args, gate):
    """POST with exponential backoff + jitter on 429, 5xx, connection errors, timeouts and bodies cut short or
    garbled on the way (a proxy's error page); honours Retry-After. Timeouts go through the gate (see Gate).
    args: --max-retries and --backoff."""
    tries, waited = 0, 0  # tries: what counts toward --max-retries; waited: timeouts retried without counting
    while True:
        wait = None
        try:
            local.session = getattr(local, "session", None) or requests.Session()
            with gate.slot() as ticket:
                # no redirects: a 307 would resend the report to wherever it points, on site or not
                r = local.session.post(url, headers=headers, json=body, timeout=ticket[1], allow_redirects=False)
            if r.status_code == 200:
                return r.json()
            err = f"HTTP {r.status_code}: {redact(r.text)[:200]!r}"  # redact first: a cut key would not match
            err += f" (redirect to {r.headers.get('Location')} not followed)" if r.is_redirect else ""
            if r.status_code != 429 and "response_format" in r.text and body.get("response_format"):
                raise Failed(err, format_refused=True)  # the same request will be refused again: no retries
            if r.status_code != 429 and r.status_code < 500:
                raise Failed(err)  # 400/401/404: retrying cannot help
            wait = float(r.headers["Retry-After"]) if r.headers.get("Retry-After", "").replace(".", "").isdigit() else None
        except requests.JSONDecodeError:  # HTTP 200 but not JSON (a proxy's error page): transient, like a 502
            err = f"HTTP 200 with a body that is not JSON: {redact(r.text)[:100]!r}"
        except requests.Timeout as e:  # (ConnectTimeout too: a server too busy to accept is slow, not gone)
            err = type(e).__name__
            if not gate.timed_out(ticket):
                waited += 1
                continue  # sent again at once, under the new setting; this was not a try
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
            err = f"{type(e).__name__}"  # ChunkedEncodingError: the body was cut short
        tries += 1
        if tries > args.max_retries:
            raise Failed(f"{err} (gave up after {tries} tries" + (f"; {waited} more timed out behind others)" if waited else ")"))
        time.sleep(wait if wait is not None else min(args.backoff * 2 ** (tries - 1), 60.0) * random.uniform(0.5, 1.5))

def check_server(args, headers):
    """GET <api-base>/models once, before anything is written -> a line to print. Nothing listening, a refused key or a
    --model the server does not list: DataError. No /models (404, 501) or too busy to answer: let through.
    args: --api-base, --model and --timeout."""
    url, wait = args.api_base.rstrip("/") + "/models", min(args.timeout, 30.0)
    try:
        r = requests.get(url, headers=headers, timeout=wait)
    except requests.ConnectionError as e:  # refused, unknown host, or no TCP answer at all (ConnectTimeout)
        why = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(e))  # "Connection refused", "Name or service not known"
        raise DataError(f"no server answers at {url} ({type(e).__name__}{': ' + why[1] if why else ''}): start it or fix --api-base")
    except requests.Timeout:
        return f"server: {url} took the connection but did not answer within {wait:g} s; going on"
    require(r.status_code not in (401, 403), f"the server at {url} refuses the API key (HTTP {r.status_code}): check OPENAI_API_KEY")
    with contextlib.suppress(ValueError, KeyError, TypeError):  # not the OpenAI list: nothing to check the name against
        listed = [m["id"] for m in r.json()["data"]] if r.status_code == 200 else []
        require(not listed or args.model in listed or f"{args.model}:latest" in listed,  # Ollama lists "name:latest"
                f"the server at {url} does not serve model {args.model!r}; it lists {listed[:8]} (set --model)")
        return f"server: {url} answers, model {args.model!r} listed" if listed else f"server: {url} answers"
    return f"server: {url} answers (HTTP {r.status_code})"
