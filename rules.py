"""
The rules labeler of distill.py: label names and synonyms found sentence by sentence, each mention judged present,
absent or uncertain by the cues of its clause. Also the agreement table that scores any labels (rules or LLM) against
reference labels: the yardstick's side of distill.py. Plain functions; imports only data.py and volumes.py (and numpy).

Scope, as pyConText does it (Chapman et al. 2011) rather than NegEx's fixed word window: a cue governs the rest of
its clause, across a list joined by commas, "and", "or", "nor":
  "No focal consolidation, suspicious opacity, large pleural effusion, or pneumothorax is identified."  -> all absent
  "The lungs are clear of focal airspace disease, pneumothorax, or pleural effusion."                  -> all absent
A scope ends at
  - a terminator: ; : but, however, although, which, that is, except, apart from, "there is/are" ...;
  - a new finding with a verb of its own, opened by a determiner or ", and": "No effusion, a small nodule is seen",
    "No effusion, and atelectasis is noted" (a list's last item keeps the scope: "..., or pneumothorax is identified";
    so does a bare noun: "No mass, nodule-infiltration was detected" is a list, as reports mostly mean it);
  - after the negated phrase's own verb, a comma or "and": "No lytic lesion is seen, and osteopenia is present."
A post-cue ("is not seen", "were not detected", "has resolved") reaches back over its own comma-separated part, and over
the whole list when that part ends one ("Pleural effusion, pericardial effusion and pneumothorax were not seen.").
Pseudo-negations ("no change in", "no significant change", "not only") are blanked first so they negate nothing.
"""
import functools
import re

import numpy as np

from data import CHEST_CT_LABELS, DataError, read_labels, require
from volumes import volume_key

# How reports say each chest_ct finding, for distill.py's rule-based labeler (the label name itself
# always counts too): phrases are plain words, "word*" = any ending, "..." = up to twelve words between
CHEST_CT_SYNONYMS = {
    "Medical material": ["medical material", "catheter*", "port", "stent*", "pacemaker*", "sternotomy", "sternal wire*", "suture*",
                         "surgical clip*", "surgical material*", "prosthe*", "breast implant*", "cardiac device*", "cabg", "acbg",
                         "endotracheal tube*", "chest tube*", "nasogastric tube*", "tracheostomy", "drain", "metallic density",
                         "metallic clip*", "clip material*"],
    "Arterial wall calcification": ["aortic calcification*", "atherosclero*", "atheroma*", "calcified plaque*", "calcific ... plaque*",
                                    "vascular calcification*", "arterial calcification*", "arterial wall calcification*", "calcif* ... aort*",
                                    "aort* ... calcif*"],
    "Cardiomegaly": ["cardiomegaly", "enlarged heart", "enlargement of the heart", "heart is enlarged", "cardiac enlargement", "heart size increased", "heart is larger",
                     "heart size is increased", "increased heart size", "cardiothoracic ... increase*", "increase* ... cardiothoracic",
                     "ctr increase*"],
    "Pericardial effusion": ["pericardial effusion*", "pericardial fluid", "effusion ... pericardi*", "fluid ... pericardi*",
                             "pericardial ... effusion*"],
    "Coronary artery wall calcification": ["coronary ... calcif*", "coronary ... atheroma*", "coronary ... plaque*", "calcif* ... coronary",
                                           "atheroma* ... coronary", "atherosclero* ... coronary", "plaque* ... coronary"],
    "Hiatal hernia": ["hiatal hernia*", "hiatus hernia*"],
    # CT-RATE's annotators mark any lymph node a report describes (millimetric ones too), so "lymph node*" counts here
    # (macro F1 0.891 -> 0.933 on the 800 reports, docs/labeler.md); a label file for clinical lymphadenopathy
    # (nodes over 1 cm short axis) should leave it out.
    "Lymphadenopathy": ["lymphadenopath*", "lymph node*", "enlarged ... lymph node*", "lymph node* ... enlarged", "pathological ... lymph node*",
                        "lymph node enlargement*", "conglomerate* ... lymph node*"],
    "Emphysema": ["emphysema*", "bulla*", "bullous", "bleb*"],
    "Atelectasis": ["atelecta*"],
    "Lung nodule": ["nodule*", "micronodule*", "nodular lesion*", "nodular opacit*", "nodular densit*"],
    "Lung opacity": ["opacit*", "ground glass", "density increase*", "increased density", "infiltrat*"],
    "Pulmonary fibrotic sequela": ["fibro*", "sequela*", "scar*", "parenchymal band*"],
    "Pleural effusion": ["pleural effusion*", "pleural fluid", "effusion in the pleural*", "bilateral effusion*", "hydrothora*",
                         "effusion* ... hemithora*", "hemithora* ... effusion*", "effusion* ... pleural space*",
                         "pleural space* ... effusion*"],
    "Mosaic attenuation pattern": ["mosaic*", "air trapping"],
    "Peribronchial thickening": ["peribronchial ... thick*", "bronchial wall* ... thick*", "peribronchovascular ... thick*",
                                 "thick* ... peribronchial", "thick* ... bronchial wall*", "thick* ... peribronchovascular",
                                 "peribronchial cuffing"],
    "Consolidation": ["consolidat*"],
    "Bronchiectasis": ["bronchiecta*"],
    "Interlobular septal thickening": ["septal thick*", "interlobular sept* ... thick*", "thick* ... interlobular sept*", "crazy paving"],
}
assert set(CHEST_CT_SYNONYMS) == set(CHEST_CT_LABELS)  # spelled exactly as data.py spells the label set

def alt(*phrases):
    """One regex alternative per phrase, longest first (so "no evidence of" wins over "no"); spaces match any gap."""
    return "|".join(p.replace(" ", r"\s+") for p in sorted(phrases, key=len, reverse=True))

SEEN = alt("seen", "noted", "present", "observed", "identified", "detected", "visualized", "visualised", "demonstrated",
           "evident", "visible", "appreciated", "found", "shown", "depicted", "monitored", "described")
BE = r"(?:is|are|was|were|has\s+been|have\s+been|had\s+been|be|being)"
# Cues, matched on a lower-cased clause. Pseudo-negations are blanked out first ("no change in" negates nothing); then
# the order of the groups in CUES matters where two start at the same word ("cannot be excluded" is a doubt, not a no).
PSEUDO = alt("no change in", "no change of", "no interval change", "no significant change", "no significant interval change",
             "no increase in", "no increase of", "no significant increase", "no decrease in", "no significant decrease",
             "no progression", "no regression", "no growth", "no difference", "no significant difference", "not only",
             "not significantly changed", "not significantly different", "not changed", "not increased", "not decreased",
             "without change", "without significant change", "without interval change", "not been changed",
             "partially resolved", "partly resolved", "incompletely resolved", "not resolved", "not completely resolved",
             "not fully resolved", "not been removed", "not removed", "not clearly", "not be evaluated", "not evaluated",
             "not well evaluated", "cannot be evaluated", "could not be evaluated")
UNC_POST = alt("cannot be excluded", "can not be excluded", "could not be excluded", "cannot be ruled out",
               "can not be ruled out", "could not be ruled out", "not be excluded", "not excluded", "not ruled out",
               "is possible", "are possible", "is likely", "are likely", "is suspected", "are suspected", "is questionable",
               "is not excluded", "is probable", "may be present", "is considered possible")
UNC_PRE = alt("possible", "possibly", "probable", "probably", "likely", "questionable", "suspicious for", "suspicion of",
              "suspicion for", "suspected", "suspect", "may represent", "may reflect", "may be", "might be", "could be",
              "could represent", "concern for", "concerning for", "suggestive of", "suggesting", "suggests", "suggest",
              "differential diagnosis", "cannot exclude", "can not exclude", "could not exclude", "cannot rule out",
              "can not rule out", "rule out", "r/o", "equivocal", "evaluate for", "evaluation for", "assess for", "to exclude")
# after the finding: "is not seen", "are no longer identified", "is absent", "has (been) resolved / removed", "was ruled
# out", "is negative", "has completely regressed"
NEG_POST = (rf"(?:{BE}\s+)?(?:also\s+|again\s+|now\s+)?(?:not|no\s+longer)\s+(?:{SEEN})|{BE}\s+absent"
            rf"|(?:has\s+|have\s+)?been\s+(?:resolved|removed|ruled\s+out|excluded)|(?:has|have)\s+(?:resolved|disappeared)"
            rf"|(?:is|are|was|were)\s+(?:negative(?!\s+for)|excluded|removed|resolved)|(?:{BE}\s+)?completely\s+(?:regressed|resolved|disappeared)")
UNC_EITHER = r"versus|vs"  # "atelectasis versus consolidation": both in doubt
NEG_EITHER = alt("resolved", "removed", "ruled out")  # "resolved pneumonia" and "the pneumonia resolved"
NEG_PRE = alt("no", "not", "without", "absence of", "negative for", "free of", "clear of", "neither", "nor",
              "no evidence of", "without evidence of", "no signs of", "no sign of", "no findings of", "resolution of",
              "removal of", "no longer")
PSEUDO_RX = re.compile(rf"\b(?:{PSEUDO})\b")
CUES = re.compile(rf"\b(?:(?P<unc_post>{UNC_POST})|(?P<unc_pre>{UNC_PRE})|(?P<neg_post>{NEG_POST})"
                  rf"|(?P<unc_either>{UNC_EITHER})|(?P<neg_either>{NEG_EITHER})|(?P<neg_pre>{NEG_PRE}))\b")
# Clause ends: nothing crosses them.
TERMINATOR = re.compile(r"[;:]|\b(?:" + alt("but", "however", "although", "though", "whereas", "while", "yet", "except",
                                           "apart from", "aside from", "other than", "with the exception of", "which",
                                           "who", "that is", "nevertheless", "instead", "there is", "there are",
                                           "there was", "there were", "there has been", "there have been", "there remains",
                                           "there remain", "shows", "showed", "show", "reveals", "revealed",
                                           "demonstrates", "demonstrated") + r")\b")
PRESENCE = re.compile(rf"\b{BE}\s+(?:also\s+|again\s+|now\s+|still\s+|newly\s+|additionally\s+)?(?:{SEEN})\b")
ASIDE = re.compile(r",\s*(?:the\s+\w+\s+of\s+)?which\b[^,;:]*,")  # ", which ...," and ", the largest of which ...,"
NEW_FINDING = re.compile(r"\s*(?:and\s+)?(?:a|an|the|this|these|those|another|one|two|three|several|multiple|a\s+few|few|some|many|numerous)\b")
VERB = re.compile(r"\b(?:is|are|was|were|has|have|had|be|been)\b")  # a finite verb closes the negated phrase it ends
COMMA = re.compile(r",\s*(?:(?:and|or|nor)\b)?")  # comma-separated parts; ", or X" / ", and X" carry their joiner
SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+|[\"\u2022\u00b7]")  # CT-RATE writes bullets as '"', '•' or '·'
VALUES = {1: "present", 0: "absent", -1: "uncertain", None: "not mentioned"}

def phrase_regex(phrase):
    """A synonym -> regex: words separated by spaces/hyphens; "word*" any ending; "..." up to twelve words between."""
    words, parts, gap = phrase.lower().replace("-", " ").split(), [], False
    for w in words:
        if w == "...":
            gap = True
            continue
        if parts:  # words separated by spaces/hyphens; a "..." gap allows up to twelve more words
            parts.append(r"[\s-]+(?:[\w,/()-]+\s+){0,12}?" if gap else r"[\s-]+")
        parts.append(re.escape(w.rstrip("*")) + (r"\w*" if w.endswith("*") else r"(?:e?s)?"))
        gap = False
    return re.compile(r"\b" + "".join(parts) + r"\b")

@functools.lru_cache(maxsize=None)
def first_word(rx):
    """The literal text every match of a phrase regex starts with ("pleural" for "pleural effusion*")."""
    return re.sub(r"\\(.)", r"\1", re.match(r"\\b((?:\\[^\w]|[^\\[(?*+])*)", rx.pattern).group(1))

def split_definitions(names, raw):
    """A label file's "definition | synonym, synonym" per name -> {name: (definition, [synonyms])}."""
    return {n: (raw.get(n, "").split("|")[0].strip(), [s.strip() for s in raw.get(n, "").partition("|")[2].split(",") if s.strip()])
            for n in names}

def compile_patterns(names, synonyms=None):
    """{name: [regex]} from each label's name, the built-in chest CT synonyms and any from a label file."""
    phrases = {n: [n] + CHEST_CT_SYNONYMS.get(n, []) + (synonyms or {}).get(n, []) for n in names}
    empty = next(((n, p) for n, ps in phrases.items() for p in ps if not re.sub(r"[\s.*-]", "", p)), None)
    require(empty is None, f"label {empty and empty[0]!r}: synonym {empty and empty[1]!r} has no word to look for "
                           "(it would match every report)")
    return {n: [phrase_regex(p) for p in ps] for n, ps in phrases.items()}

def clauses(text):
    """(clause, its sentence) pairs: sentences split at terminators. An aside (", which ... ,") is a clause of its own
    and blanked from the sentence around it, so "A nodule, which was seen before, is not seen now" still reaches back to
    "nodule". Blanking keeps lengths, so positions and the explained sentence stay the report's. Brackets stay in their
    clause: "possible medical material (port and catheter)" puts the catheter in doubt too."""
    for sentence in SENTENCE.split(text.lower()):
        for aside in ASIDE.finditer(sentence):
            yield aside.group(), sentence.strip()
        outer, start = ASIDE.sub(lambda m: " " * len(m.group()), sentence), 0
        for m in list(TERMINATOR.finditer(outer)) + [None]:
            end = m.start() if m else len(outer)
            if outer[start:end].strip():
                yield outer[start:end], sentence.strip()
            start = m.end() if m else end

def parts_of(clause):
    """Comma-separated parts: [(start, end, joiner)] with joiner "," "and" "or" "nor" (None for the first part)."""
    cuts = [(m.start(), m.end(), (m.group().strip(", ") or ",")) for m in COMMA.finditer(clause)]
    starts = [(0, None)] + [(e, j) for _, e, j in cuts]
    ends = [s for s, _, _ in cuts] + [len(clause)]
    return [(s, e, j) for (s, j), e in zip(starts, ends)]

def ends_list(clause, parts, j):
    """Does part j end a list ("..., or pneumothorax is identified", "..., B and C were seen")? Then its verb belongs to
    the whole list. ", and X is seen" right after the first part is a new clause, not the end of a list."""
    s, e, joiner = parts[j]
    closes = lambda k: parts[k][2] in ("or", "nor", "and") or re.search(r"\b(?:and|or|nor)\b", clause[parts[k][0]:parts[k][1]])
    if joiner == "and":  # "A, B, and C" ends a list; "A, B or C, and D is seen" does not: that list was closed already
        return j >= 2 and not closes(j - 1)
    return joiner in ("or", "nor") or re.search(r"\b(?:and|or|nor)\b", clause[s:e]) is not None

def new_finding(clause, parts, j):
    """Is part j a new finding with a verb of its own ("No effusion, a small nodule is seen", "..., and the heart is
    enlarged", "No effusion, and atelectasis is noted")? A bare noun with a verb ("No mass, nodule-infiltration was
    detected") is taken as the end of the negated list: reports write that shape far more often than a comma splice."""
    s, e, joiner = parts[j]
    opens = (joiner == "and" and j == 1) or NEW_FINDING.match(clause, s) is not None
    return opens and VERB.search(clause, s, e) is not None and not ends_list(clause, parts, j)

@functools.lru_cache(maxsize=4096)
def analyse(clause):
    """What every mention in a clause shares: the clause with pseudo-negations blanked, its parts, its cues."""
    masked = PSEUDO_RX.sub(lambda m: " " * len(m.group()), clause)  # pseudo-negations negate nothing
    return masked, parts_of(masked), list(CUES.finditer(masked))

def judge(clause, start, end):
    """(value, cue) for the mention clause[start:end]: -1 uncertain, 0 absent, 1 present; cue None when none applies."""
    masked, parts, cues = analyse(clause)
    part_at = lambda pos: next(i for i, (s, e, _) in enumerate(parts) if pos <= e)
    m_first, m_last = part_at(start), part_at(end)
    pre = post = None
    for cue in cues:
        kind = cue.lastgroup
        if kind.endswith(("pre", "either")) and cue.end() <= start:  # forward scope from the cue to the mention
            c = part_at(cue.start())
            between = masked[cue.end():start]
            if ")" in between and masked.rfind("(", 0, cue.start()) > masked.rfind(")", 0, cue.start()):
                continue  # a cue inside brackets stays there: "nodule (no calcification), effusion"
            if c == m_first and re.search(rf"(?:{VERB.pattern}).*\band\b", between):
                continue  # "No X is seen and Y": the negated phrase ended with its verb
            if any(VERB.search(masked[max(cue.end(), parts[j][0]):parts[j][1]]) for j in range(c, m_first)):
                continue  # "No X was detected, Y ...": a comma after the negated phrase's verb ends the scope
            if any(new_finding(masked, parts, j) for j in range(c + 1, m_first + 1)):
                continue  # "No X, Y is seen": a new finding with its own verb of presence
            pre = cue  # the nearest cue in scope wins: later ones overwrite
        elif start < cue.start() and cue.end() <= end and post is None:
            post = cue  # inside a "..." gap: "pleural effusion-thickening was not detected in both hemithorax"
        elif kind.endswith(("post", "either")) and cue.start() >= end and post is None:  # backward scope from the cue
            p = part_at(cue.start())
            if masked.rfind("(", end, cue.start()) > masked.rfind(")", end, cue.start()):
                continue  # "pneumothorax (not seen on the prior study)": a cue inside brackets stays there
            if PRESENCE.search(masked[end:cue.start()]):
                continue  # "X is seen in the base and Y is not seen"
            if p != m_last and (not ends_list(masked, parts, p) or any(VERB.search(masked[parts[j][0]:parts[j][1]])
                                                                        for j in range(m_last, p))):
                continue  # "Consolidation in the base, effusion is not seen": not a list, the cue is Y's only
            post = cue
    if masked[end:].lstrip().startswith("?"):  # "atelectasis?": a question mark right after a finding is a doubt
        return -1, "?"
    cues = [c for c in (pre, post) if c is not None]
    for c in cues:  # uncertainty beats negation: "no X cannot be excluded" is a possibility, not an absence
        if c.lastgroup.startswith("unc"):
            return -1, c.group()
    return (0, cues[0].group()) if cues else (1, None)

def explain(text, patterns):
    """{label: (value, mention, cue, sentence)} for one report: the mention that decided each label.
    Per label, a positive mention beats an uncertain one, which beats a negative one (None: not mentioned)."""
    out, rank = {n: (None, None, None, None) for n in patterns}, {None: 0, 0: 1, -1: 2, 1: 3}  # present > uncertain > absent
    for clause, sentence in clauses(text):
        for name, regexes in patterns.items():
            for rx in regexes:
                if first_word(rx) not in clause:
                    continue  # a cheap test first: most synonyms are absent from most clauses
                for m in rx.finditer(clause):
                    value, cue = judge(clause, m.start(), m.end())
                    if rank[value] > rank[out[name][0]]:
                        out[name] = (value, m.group(), cue, sentence)
    return out

def rules_label(text, patterns):
    """{label: 1/0/-1/None} for one report (see explain)."""
    return {n: v[0] for n, v in explain(text, patterns).items()}

def explanation(text, patterns):
    """explain() as text: one line per label, its decision, the words that matched, the cue and the sentence."""
    lines = []
    for name, (value, mention, cue, sentence) in explain(text, patterns).items():
        why = f'  "{mention}"' + (f', cue "{cue}"' if cue else ", no cue") + f'  in: "{sentence}"' if mention else ""
        lines.append(f"  {name:34s} {VALUES[value]:13s}{why}")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# agreement with reference labels: the yardstick's table, for rules and LLM labels alike

def read_reference(path, names, ids, table=None):
    """{volume_key(id): (C,) labels} from any label CSV holding (at least) the label columns, else from the manifest
    Table the reports came from (if it has labels), else None. Ids match with or without a file extension. No column
    for a label, or no id in common: DataError."""
    if not path:
        if table is None or not set(names) <= set(table.label_names) or np.isnan(table.labels).all():
            return None
        cols = [table.label_names.index(n) for n in names]
        return {volume_key(rid): table.labels[i, cols] for i, rid in enumerate(table.ids)}
    ref_ids, ref_names, ref_vals = read_labels(path)
    require(set(names) <= set(ref_names), f"{path}: no column for label(s) {sorted(set(names) - set(ref_names))[:5]}")
    ref = {volume_key(i): v for i, v in zip(ref_ids, ref_vals[:, [ref_names.index(n) for n in names]])}
    unmatched = [rid for rid in ids if volume_key(rid) not in ref]
    if len(unmatched) == len(ids):
        raise DataError(f"{path}: none of its ids matches a report id (e.g. {ref_ids[:1]} vs {ids[:1]})")
    if unmatched:
        print(f"note: {len(unmatched)} report ids have no row in {path} (e.g. {unmatched[0]}): left out of the agreement table")
    return ref

def agreement(names, results, reference, source):
    """Per label, present vs rest (accuracy, F1, kappa) and a 3x3 confusion matrix of predicted labels ({name: 1/0/-1/
    None} per report) against reference rows ((C,) of 1/0/-1/nan). Prints the table; -> (CSV header, CSV rows, report
    dict with undefined values as None)."""
    from sklearn.metrics import cohen_kappa_score  # here: a restart after a kill should not wait for sklearn
    pred = np.array([[np.nan if r[n] is None else r[n] for n in names] for r in results], dtype=float)  # (N, C)
    gold = np.array(reference, dtype=float)  # (N, C)
    print(f"agreement with {source} on {len(pred)} reports "
          "(confusion: rows reference, columns prediction; present / absent / uncertain-or-missing)")
    # classes 0 present, 1 absent, 2 uncertain or not mentioned (the paper's Figure S1 groups them so)
    to3 = lambda v: np.where(v == 1, 0, np.where(v == 0, 1, 2))  # noqa: E731
    rows, report = [], {"n": len(pred), "labels": {}}
    print(f"{'label':36s} {'acc':>6s} {'F1':>6s} {'kappa':>6s}  confusion")
    for c, name in enumerate(names):
        p3, g3 = to3(pred[:, c]), to3(gold[:, c])
        yp, yg = p3 == 0, g3 == 0
        tp, fp, fn = int((yp & yg).sum()), int((yp & ~yg).sum()), int((~yp & yg).sum())
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")  # undefined without any positive, not 0
        kappa = float(cohen_kappa_score(yg, yp)) if len(set(yg) | set(yp)) > 1 else float("nan")
        cm = [[int(((g3 == i) & (p3 == j)).sum()) for j in range(3)] for i in range(3)]
        m = {"accuracy": float((yp == yg).mean()), "f1": f1, "kappa": kappa, "confusion": cm}
        report["labels"][name] = m
        rows.append([name, len(pred), int(yg.sum()), int(yp.sum()), *(f"{m[k]:.4f}" for k in ("accuracy", "f1", "kappa"))]
                    + sum(cm, []))
        print(f"{name:36s} {m['accuracy']:6.3f} {f1:6.3f} {kappa:6.3f}  {cm}")
    for k in ("accuracy", "f1", "kappa"):
        report[f"macro_{k}"] = float(np.nanmean([m[k] for m in report["labels"].values()]))
    print(f"{'macro mean':36s} {report['macro_accuracy']:6.3f} {report['macro_f1']:6.3f} {report['macro_kappa']:6.3f}")
    kinds = ["present", "absent", "other"]
    header = ["label", "n", "ref_present", "pred_present", "accuracy", "f1", "kappa"] + [f"ref_{a}_pred_{b}" for a in kinds for b in kinds]
    plain = lambda o: {k: plain(v) for k, v in o.items()} if isinstance(o, dict) else None if o != o else o  # noqa: E731
    return header, rows, plain(report)
