"""
Stage 1, distill: turn free-text radiology reports into structured labels.

Reads reports: the demo set (default, built if missing), a generic manifest (SPEC: id, report, labels), a CT-RATE
reports CSV (VolumeName, Findings_EN, Impressions_EN; text = findings + impression) or any CSV with an id and a text
column (auto-detected, or --id-column / --text-column). Writes, under --out (default out/distill):
  labels.csv      id + one column per label: 1 present, 0 absent, -1 uncertain, empty = not mentioned
  failures.csv    id, reason for every report that has no labels (never dropped, never filled with a default)
  cache.jsonl     every LLM answer, appended the moment it arrives; a rerun asks only for what is missing
  agreement.csv / agreement.json   per-label accuracy, F1, kappa, 3x3 confusion vs --reference (if any)

Backends: "llm" asks any OpenAI-compatible chat-completions server for JSON (vLLM, Ollama, OpenAI, llama.cpp) after
checking once that it answers and lists --model; the key comes from OPENAI_API_KEY only and is redacted everywhere.
Its prompt is system_prompt's (below), one request per report (label_one); --dry-run prints the request as sent.
Reports are patient data: an --api-base off this site's network is refused unless --allow-remote-api says otherwise.
"rules" (rules.py): label names and synonyms, each mention judged by the cues of its clause; offline, the yardstick.

Label files (--labels my_labels.txt): one "name: definition | synonym, synonym" a line (both parts optional), '#' a comment:
  Lung nodule: a focal rounded opacity up to 3 cm | nodule*, micronodule*, nodular opacit*
The rules look for the name and each synonym ("word*": any ending; "...": up to twelve words between, as in "spleen ...
enlarged"); the LLM prompt shows definition and synonyms. --explain ID shows, per label, the words that matched, the
deciding cue ("no", "is not seen", "possible") and the sentence. Example: examples/chexpert_labels.txt.

Examples:
  python distill.py --backend rules                        # demo set, offline, compares with its ground truth
  python distill.py --backend rules --labels examples/chexpert_labels.txt --reports my.csv --explain 17
  OPENAI_API_KEY=... python distill.py --api-base http://localhost:8000/v1 --model Qwen/Qwen2.5-7B-Instruct \\
      --reports ct_rate_reports.csv --concurrency 32
"""
import argparse, contextlib, csv, hashlib, io, json, os, re, sys, threading, time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from types import SimpleNamespace

from tqdm import tqdm

from data import ID_COLUMNS, DataError, HelpFormatter, UsageError, load_table, require, resolve_label_set, run_main, write_atomic
from demo import ensure_demo
from llm import Failed, Gate, check_server, on_site, post, redact, request_headers
from rules import agreement, compile_patterns, explanation, phrase_regex, read_reference, rules_label, split_definitions  # noqa: F401
from volumes import volume_key

# -----------------------------------------------------------------------------
# config

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--reports", default="data/demo", help="demo/manifest folder, manifest CSV, CT-RATE reports CSV or any id+text CSV (non-UTF-8 bytes: U+FFFD, rows named; default: %(default)s, the demo set, built if missing)")
    g.add_argument("--id-column", default=None, help="id column of a plain CSV (default: first of id, VolumeName, AccessionNo, NoteAcc_DEID)")
    g.add_argument("--text-column", default=None, help="text column of a plain CSV (default: report, report_text, text, or Findings_EN + Impressions_EN)")
    g.add_argument("--labels", default="chest_ct", help="chest_ct, abdomen_ct, a label .txt file (format under 'Label files' above) or a label CSV (its columns; default: %(default)s)")
    g.add_argument("--limit", type=int, default=None, help="label only the first N reports (default: all)")
    g.add_argument("--reference", default=None, help="reference label CSV for agreement (default: the manifest's own labels, if any)")
    g.add_argument("--out", default="out/distill", help="output folder (labels.csv, failures.csv, cache.jsonl, agreement.*, response_format.json; default: %(default)s)")
    g.add_argument("--explain", default=None, metavar="ID", help="rules backend: print why report ID got each label (mention, cue, sentence); writes nothing (default: off)")
    g = p.add_argument_group("backend")
    g.add_argument("--backend", choices=["llm", "rules"], default="llm", help="llm: OpenAI-compatible server; rules: offline, rules.py (default: %(default)s)")
    g.add_argument("--api-base", default=os.environ.get("OPENAI_BASE_URL"), help="server base URL, e.g. http://localhost:8000/v1 (default: $OPENAI_BASE_URL)")
    g.add_argument("--allow-remote-api", action="store_true",
                   help="let reports (patient data) go to an --api-base off this site. Without it only these count as on site: "
                        "loopback, private (10/8, 172.16/12, 192.168/16, fc00::/7) and link-local addresses, localhost, names "
                        "without a dot (a LAN host, a container) and names under .local, .internal, .lan, .home.arpa; names "
                        "are judged as written, never looked up (default: off)")
    g.add_argument("--model", default=os.environ.get("OPENAI_MODEL"), help="model name as the server lists it at <api-base>/models (default: $OPENAI_MODEL)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: %(default)s, reproducible labels)")
    g.add_argument("--max-tokens", type=int, default=1024, help="answer length cap (default: %(default)s)")
    g.add_argument("--dry-run", action="store_true", help="show the prompt for the first report, the cached count and whether the server answers (exit 2 if not); send no report (default: off)")
    g = p.add_argument_group("throughput and retries")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight at most; halved on a timeout (a server serving one request at a time wants 1; default: %(default)s)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one answer; doubled (up to 8x) when a lone request times out (default: %(default)g)")
    g.add_argument("--max-retries", type=int, default=5, help="retries on 429 / 5xx / connection error / a lone request's timeout, before a report fails (default: %(default)s)")
    g.add_argument("--backoff", type=float, default=1.0, help="first backoff in seconds; doubles per retry, with jitter (default: %(default)g)")
    g.add_argument("--response-format", default=None, choices=["json_schema", "json_object", "none"],
                   help="how JSON is requested (json_object: llama-cpp-python's form); a refused form is downgraded once, and the "
                        "form that worked is remembered per server and model in <out>/response_format.json (default: that "
                        "form, else json_schema)")
    g.add_argument("--max-fixes", type=int, default=2, help="re-asks when an answer fails validation, error fed back (default: %(default)s)")
    return p.parse_args(argv)

# -----------------------------------------------------------------------------
# data: reports (+ reference labels from a manifest) in, CSVs out

def write_csv(path, header, rows):
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header] + rows)
    write_atomic(path, buf.getvalue())

def read_reports(args):
    """(ids, texts, manifest Table or None). Manifests go through data.load_table; other CSVs are read here."""
    path = ensure_demo(Path(args.reports)) if args.reports == "data/demo" else Path(args.reports)  # built if missing
    require(path.exists(), f"{path}: no such file or folder")
    raw = "" if path.is_dir() else path.read_bytes().decode("utf-8-sig", errors="replace")
    header, *rows = list(csv.reader(io.StringIO(raw, newline=""))) or [[]]
    if path.is_dir() or ("report" in header and not (args.text_column or args.id_column)):
        table = load_table(path)  # a generic manifest (or its folder): its labels are the default reference
        return list(table.ids), list(table.reports), table
    bad = [i for i, r in enumerate(rows, 1) if "\ufffd" in "".join(r)]  # row 1 = first row after the header, as in data.py
    if bad:
        print(f"warning: {path}: bytes that are not UTF-8 replaced by U+FFFD in rows {bad[:10]}{' ...' if len(bad) > 10 else ''}")
    idc = args.id_column or next((c for c in ID_COLUMNS if c in header), None)
    ctrate = not args.text_column and {"Findings_EN", "Impressions_EN"} <= set(header)
    txc = args.text_column or next((c for c in ("report_text", "text", "Findings_EN") if c in header), None)
    if not set(filter(None, [idc, txc])) <= set(header) or txc is None:
        raise DataError(f"{path}: no id/text column found in {header[:6]} (use --id-column / --text-column)")
    col = lambda c: [r[header.index(c)] if header.index(c) < len(r) else "" for r in rows]
    ids = [i.strip() for i in col(idc)] if idc else [str(i) for i in range(1, len(rows) + 1)]
    # CT-RATE reports: the text a radiologist reads is findings + impression
    texts = [f"{f}\n{i}" for f, i in zip(col("Findings_EN"), col("Impressions_EN"))] if ctrate else col(txc)
    dup = next((i for i, k in Counter(ids).items() if k > 1 or not i), None)
    require(dup is None, f"{path}: duplicate or empty id {dup!r}")
    return ids, texts, None

# -----------------------------------------------------------------------------
# the llm backend, 1: the prompt, and the answer it asks for (one of four strings per label, mapped to the stored
# coding); --dry-run prints both as a server would receive them

VALUES = {"present": 1, "absent": 0, "uncertain": -1, "not mentioned": None}
CODE = {1: "1", 0: "0", -1: "-1", None: ""}
PROMPT_VERSION = "v1"  # bump by hand on a wording change; the text hash below catches forgotten bumps

def system_prompt(names, defs):
    # Definitions and synonyms help the model map a report's wording onto the label (e.g. "ACBG wires" = material).
    lines = [f'- "{n}"' + (f": {defs[n][0]}" if defs[n][0] else "") + (f" (also written: {', '.join(defs[n][1]).replace('*', '')})" if defs[n][1] else "")
             for n in names]
    return ("You are a radiologist extracting findings from a radiology report. For each finding below answer exactly one of:\n"
            '"present" - the report states the finding is there;\n'
            '"absent" - the report states it is not there (e.g. "no effusion");\n'
            '"uncertain" - the report raises it only as a possibility (possible, probable, cannot be excluded, suspicious for);\n'
            '"not mentioned" - the report says nothing about it. Do not confuse "uncertain" with "not mentioned".\n'
            "Findings:\n" + "\n".join(lines) +
            "\nAnswer with one JSON object whose keys are the finding names exactly as written above, and nothing else.")

def response_schema(names, kind="json_schema"):
    # Servers that support structured output then cannot emit an invalid answer. OpenAI and vLLM take the
    # "json_schema" form; llama-cpp-python's server refuses it (HTTP 500) but takes "json_object" + "schema".
    prop = {"type": "string", "enum": list(VALUES)}
    schema = {"type": "object", "properties": {n: prop for n in names}, "required": names, "additionalProperties": False}
    return ({"type": "json_object", "schema": schema} if kind == "json_object" else
            {"type": "json_schema", "json_schema": {"name": "labels", "strict": True, "schema": schema}})

FORMATS = ("json_schema", "json_object", "none")  # --response-format, strongest first: a refused one goes to the next

def read_memory(path):
    """<out>/response_format.json: {api base: {model: the response format that last worked}}; {} if missing or torn."""
    with contextlib.suppress(OSError, ValueError):
        memory = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(memory, dict) and all(isinstance(v, dict) for v in memory.values()):
            return memory
    return {}

def parse_answer(text, names):
    """Labels from an answer: the first JSON object anywhere in it (code fences, prose around). ValueError says why not."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the answer is empty")
    obj, dec = None, json.JSONDecoder()
    for m in re.finditer(r"\{", text):  # a server that ignores response_format may wrap the JSON in prose or fences
        with contextlib.suppress(json.JSONDecodeError):  # not JSON from this brace on: try the next one
            obj = dec.raw_decode(text, m.start())[0]
            break
    if not isinstance(obj, dict):
        raise ValueError("no JSON object found in the answer")
    missing = [n for n in names if n not in obj]
    bad = [f"{n!r}: {obj[n]!r}" for n in names if n in obj and not (isinstance(obj[n], str) and obj[n].strip().lower() in VALUES)]
    if missing or bad:
        raise ValueError(f"missing findings: {missing}; values not allowed: {bad} (each value must be one of {list(VALUES)})")
    return {n: VALUES[obj[n].strip().lower()] for n in names}

# -----------------------------------------------------------------------------
# the llm backend, 2: one chat request per report, sent by llm.py (retried on overload), re-asked on an invalid answer;
# every answer cached the moment it arrives. The threads share one plain namespace, `llm` (made in label_llm).

def request_body(args, names, messages, fmt):
    """The chat-completions request: the messages, the sampling flags, and the JSON form asked for (fmt, FORMATS)."""
    return {"model": args.model, "messages": messages, "temperature": args.temperature, "max_tokens": args.max_tokens} | (
        {"response_format": response_schema(names, fmt)} if fmt != "none" else {})

def ask(llm, messages):
    """POST one request in the current response format -> the server's JSON answer. A server that refuses the form
    (llama.cpp refuses json_schema) moves every thread to the next one in FORMATS, and the request is sent again."""
    while True:
        used = llm.fmt
        try:
            resp = post(llm.url, llm.headers, request_body(llm.args, llm.names, messages, used), llm.args, llm.gate)
            llm.accepted.add(used)  # forms the server answered: the one to remember for the next run
            return resp
        except Failed as e:
            if not e.format_refused or used == "none":
                raise
            with llm.lock:
                if llm.fmt == used:  # another thread may have downgraded already
                    llm.fmt = FORMATS[FORMATS.index(used) + 1]
                    tqdm.write(f"note: the server refused response_format {used!r}; now using {llm.fmt!r}")

def label_one(llm, rid, text):
    """One report -> its labels. The messages: the system prompt, then the report. An answer that does not parse is
    shown back to the model with the error and asked again, --max-fixes times; a valid one is on disk before it counts."""
    messages = [{"role": "system", "content": llm.system}, {"role": "user", "content": text}]
    for fix in range(llm.args.max_fixes + 1):
        resp = ask(llm, messages)
        with llm.lock:
            llm.tokens += int((resp.get("usage") or {}).get("total_tokens") or 0)
        try:
            content = resp["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise Failed(f"malformed response (no choices[0].message.content): {str(resp)[:200]!r}")
        try:
            labels = parse_answer(content, llm.names)
        except ValueError as e:  # show the model its mistake and ask again, a bounded number of times
            error = str(e)
            messages += [{"role": "assistant", "content": content or ""},
                         {"role": "user", "content": f"That answer is invalid: {error}. Answer again with only the JSON object."}]
            continue
        rec = {"id": rid, "sha256": llm.sha[rid], "model": llm.args.model, "prompt_version": llm.version, "labels": labels,
               "raw": content, "usage": resp.get("usage"), "tries": fix + 1, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with llm.lock:  # one whole line per answer, on disk before we count it as done
            llm.cache_file.write(redact(json.dumps(rec)) + "\n")
            llm.cache_file.flush()
            os.fsync(llm.cache_file.fileno())
        return labels
    raise Failed(f"invalid answer after {llm.args.max_fixes + 1} tries: {error}")

def read_cache(path):
    """cache.jsonl -> ({(id, text sha256, model, prompt version): labels}, unreadable lines, the file's text). A rerun
    reuses an answer only for the same text, model and prompt version."""
    cached, torn, lines = {}, 0, path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    for line in lines.splitlines():
        try:
            rec = json.loads(line)
            cached[(rec["id"], rec["sha256"], rec["model"], rec["prompt_version"])] = rec["labels"]
        except (json.JSONDecodeError, KeyError, TypeError):
            torn += 1  # a line cut short when a run was killed mid-write: that report is simply asked again
    return cached, torn, lines

def show_request(llm, todo, answered, cache_path):
    """--dry-run: the request for the first report, in short, and where a run would start."""
    require(todo, "no non-empty report to show a request for")
    shown = {k: ("Bearer [REDACTED]" if k == "Authorization" else v) for k, v in llm.headers.items()}
    brief = request_body(llm.args, llm.names, [], llm.fmt) | {"messages": "[system prompt, report] as below"} | (
        {"response_format": f"{llm.fmt}: an object with one key per label ({len(llm.names)}), each one of "  # not 150 lines of enums
                            f"{' | '.join(VALUES)}"} if llm.fmt != "none" else {})
    print(f"POST {llm.url}\nheaders: {json.dumps(shown)}\nbody: {json.dumps(brief)}\n--- system prompt (prompt {llm.version}) ---\n"
          f"{llm.system}\n--- report {todo[0][0]} ---\n{redact(todo[0][1])}\n---\ncache: {len(answered)} of {len(todo)} reports "
          f"already answered ({cache_path})")

def label_llm(args, names, defs, todo, out):
    """{id: labels} and {id: reason} for the reports in todo (None after --dry-run): the answers cached before, and the
    rest asked in --concurrency threads (label_one)."""
    system = system_prompt(names, defs)
    llm = SimpleNamespace(  # what the threads share; fmt, tokens, accepted and the cache file change under llm.lock
        args=args, names=names, system=system, url=args.api_base.rstrip("/") + "/chat/completions", headers=request_headers(),
        version=f"{PROMPT_VERSION}-{hashlib.sha256(system.encode()).hexdigest()[:8]}",
        sha={rid: hashlib.sha256(text.encode()).hexdigest() for rid, text in todo}, gate=Gate(args.concurrency, args.timeout),
        fmt=None, accepted=set(), tokens=0, lock=threading.Lock(), cache_file=None)
    # The response format: --response-format, else the one that worked last time with this server and model (a server
    # that refuses json_schema refuses it every run), else json_schema. Downgraded for every thread if refused (ask).
    memory_path, server = out / "response_format.json", args.api_base.rstrip("/")
    remembered = read_memory(memory_path).get(server, {}).get(args.model)
    remembered = remembered if remembered in FORMATS else None
    llm.fmt = args.response_format or remembered or FORMATS[0]
    why = "--response-format" if args.response_format else f"worked last time, remembered in {memory_path}" if remembered else "default"
    print(f"response_format: {llm.fmt} ({why})")
    cache_path = out / "cache.jsonl"
    cached, torn, lines = read_cache(cache_path)
    results = {rid: cached[key] for rid, _ in todo if (key := (rid, llm.sha[rid], args.model, llm.version)) in cached}
    if args.dry_run:
        show_request(llm, todo, results, cache_path)
        print(check_server(args, llm.headers))  # no server, key refused, model not listed: exit 2, as a real run would stop
        return None
    print(check_server(args, llm.headers))  # before anything is written: a wrong URL or model costs one line, not a run
    todo = [(rid, text) for rid, text in todo if rid not in results]
    print(f"cache: {len(results)} answered before ({cache_path}{f', {torn} unreadable lines skipped' if torn else ''}); "
          f"{len(todo)} to ask {args.model} at {args.api_base} (prompt {llm.version})")
    out.mkdir(parents=True, exist_ok=True)
    failures, llm.cache_file = {}, open(cache_path, "a", encoding="utf-8")
    llm.cache_file.write("\n" if lines and not lines.endswith("\n") else "")  # after a torn last line, never glued onto it
    t_llm, pool = time.time(), ThreadPoolExecutor(args.concurrency)
    try:
        with tqdm(total=len(todo), desc="llm", unit="report") as bar:
            llm.gate.show = lambda: bar.set_postfix(failed=len(failures), tokens=llm.tokens, timeouts=llm.gate.timeouts,
                                                    in_flight_max=llm.gate.limit)
            futures = {pool.submit(label_one, llm, rid, text): rid for rid, text in todo}
            for fut in as_completed(futures):
                rid = futures[fut]
                try:
                    results[rid] = fut.result()
                except Exception as e:  # Failed, or anything unexpected: recorded with its reason, never dropped
                    failures[rid] = redact(str(e) if isinstance(e, Failed) else f"{type(e).__name__}: {e}")
                bar.update(1)
                llm.gate.show()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C: finish (and cache) what is in flight
        llm.cache_file.close()
    if llm.fmt in llm.accepted and llm.fmt != (remembered or FORMATS[0]):  # the next run starts with the form that worked
        memory = read_memory(memory_path)  # read again: another model's entry may have been written meanwhile
        write_atomic(memory_path, json.dumps(memory | {server: memory.get(server, {}) | {args.model: llm.fmt}}, indent=2))
        print(f"response_format: {llm.fmt} remembered for {server} and {args.model} in {memory_path}")
    print(f"llm: {len(todo)} reports in {time.time() - t_llm:.2f} s, {llm.tokens} tokens"
          + (f"; {llm.gate.timeouts} requests timed out, finished at --concurrency {llm.gate.limit} --timeout {llm.gate.timeout:g}"
             if llm.gate.timeouts else ""))
    return results, failures

def main():
    args = get_args()
    t0, out = time.time(), Path(args.out)
    # Reports are patient data: they go to an off-site server only if the user says so, checked before one is read.
    # (The rules backend and --explain send nothing, so --api-base does not matter to them.)
    if args.backend == "llm" and args.explain is None and args.api_base and not on_site(args.api_base):
        if not args.allow_remote_api:
            raise UsageError(f"--api-base {args.api_base} is not a local or private-network address: reports are patient data "
                             f"and would leave the site (pass --allow-remote-api if that is allowed; see --help)")
        print(f"note: --allow-remote-api: reports go to {args.api_base}, off this site's network")
    names, raw_defs = resolve_label_set(args.labels)
    defs = split_definitions(names, raw_defs)  # {name: (definition, [synonyms])}: the prompt and the rules use both
    patterns = compile_patterns(names, {n: defs[n][1] for n in names})
    ids, texts, table = read_reports(args)
    if args.explain is not None:  # why report ID got each label (rules backend); nothing is written
        require(args.explain in ids, f"--explain {args.explain}: no report with that id in {args.reports} (ids look like {ids[:3]})")
        return print(f"report {args.explain}, rules backend, labels {args.labels}:\n{explanation(texts[ids.index(args.explain)], patterns)}")
    ids, texts = ids[:args.limit or None], texts[:args.limit or None]  # --limit N: the first N only
    print(f"reports: {len(ids)} from {args.reports} | labels: {len(names)} ({args.labels}) | backend: {args.backend}")
    # Reference labels for the agreement table, read now: a wrong file fails in a second, not after the LLM bill.
    ref = read_reference(args.reference, names, ids, table)  # volume_key(id) -> (C,) labels, or None

    # -----------------------------------------------------------------------------
    # label every report: rules at once, llm through the cache and a thread pool
    # An empty report has nothing to label: sending it would only buy a hallucination.
    results, failures = {}, {rid: "empty report" for rid, text in zip(ids, texts) if not text.strip()}
    todo = [(rid, text) for rid, text in zip(ids, texts) if rid not in failures]
    if args.backend == "rules":
        results = {rid: rules_label(text, patterns) for rid, text in tqdm(todo, desc="rules", unit="report", disable=len(todo) < 1000)}
    else:
        require(args.api_base and args.model, "the llm backend needs --api-base and --model (or OPENAI_BASE_URL / "
                                              "OPENAI_MODEL); --backend rules labels offline")
        if (llm := label_llm(args, names, defs, todo, out)) is None:
            return  # --dry-run
        results, failures = llm[0], failures | llm[1]

    # -----------------------------------------------------------------------------
    # write labels.csv and failures.csv atomically (a half-written labels file would poison every later stage)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "labels.csv", ["id"] + names, [[rid] + [CODE[results[rid][n]] for n in names] for rid in ids if rid in results])
    write_csv(out / "failures.csv", ["id", "reason"], [[rid, failures[rid]] for rid in ids if rid in failures])
    common = [rid for rid in ids if rid in results and ref is not None and volume_key(rid) in ref]
    if common:  # agreement with the reference: present vs rest per label, and the 3x3 confusion (rules.agreement)
        header, rows, report = agreement(names, [results[r] for r in common], [ref[volume_key(r)] for r in common],
                                         args.reference or "the manifest labels")
        write_csv(out / "agreement.csv", header, rows)
        write_atomic(out / "agreement.json", json.dumps(report, indent=2))  # undefined F1 / kappa -> null

    # -----------------------------------------------------------------------------
    # final summary
    print(f"labelled {len(results)}/{len(ids)} reports -> {out / 'labels.csv'} | failures: {len(failures)} -> {out / 'failures.csv'}"
          f" | {time.time() - t0:.1f} s")
    print("".join(f"  failed {rid}: {failures[rid]}\n" for rid in list(failures)[:5]), end="")
    if failures:
        sys.exit(1)  # a partial label set must not pass silently in a pipeline; rerun to retry only these

if __name__ == "__main__":
    run_main(main)
