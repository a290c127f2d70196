"""Benchmark metrics, as pure functions that reproduce the official scoring scripts.

Two answer normalisations exist in the VQA world, and benchmarks differ in which one they use:

- :func:`vqa_accuracy` is the official VQA v2 evaluation (GT-Vision-Lab/VQA,
  ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, master). It normalises *only when the ten human
  answers disagree*, and then both the answers and the prediction; when all humans gave the same string,
  the prediction must match it character for character (after newline/tab replacement and strip).
- :func:`evalai_normalize` is the EvalAI/MMF ``EvalAIAnswerProcessor`` (pythia ``processors.py``) that
  LLaVA's ``m4c_evaluator.py`` and lmms-eval use for TextVQA and VizWiz, and that LLaVA applies to
  VQAv2 predictions before writing the submission file. See its docstring for the differences.

The other metrics follow the scripts LLaVA-1.5 reports with: ``eval_pope.py`` (POPE), MME's
``eval_tool/calculation.py``, ``eval_science_qa.py`` (ScienceQA letter parsing), LLaVA's
``convert_gqa_for_eval.py`` + GQA's exact match, and MMBench's circular evaluation with VLMEvalKit's
rule-based answer extraction (``can_infer``) instead of a GPT judge.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# --- Tables shared by vqaEval.py and EvalAIAnswerProcessor (identical in both) ---------------------------

# Contraction fixes, applied word by word after lower-casing. Kept exactly as in the official script,
# including its quirks: keys with capitals ("Im", "Ive", "Id've") can never match a lower-cased word,
# and "somebody'd" maps *to* "somebodyd".
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
# Note: no apostrophe, no colon, no period (periods have their own rule below).
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a look-*ahead* for the literal "<="
# (a typo for a look-behind) and always succeeds before a ".", so it removes every period not followed
# by a digit: "1.5" keeps its period, "yes." and "a.m." lose theirs.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official call is ``periodStrip.sub("", text, re.UNICODE)``: the flag lands in the ``count``
# argument, so at most re.UNICODE == 32 periods are removed.
PERIOD_STRIP_MAX = 32
# vqaEval: a digit-comma-digit anywhere ("1,000") switches punctuation handling from "replace by a
# space" to "delete" for every mark.
VQA_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# EvalAI's variant of the same test; it never fires, because its tokenizer deletes all commas first.
EVALAI_COMMA_STRIP = re.compile(r"(?<=\d)(,)+(?=\d)")


def _process_punctuation(text: str, comma_strip: re.Pattern[str]) -> str:
    """vqaEval ``processPunctuation``: delete or blank out marks, then strip periods."""
    delete_all = comma_strip.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The space test looks at the *input* text, the replacement acts on the running output.
        if mark + " " in text or " " + mark in text or delete_all:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_MAX)


def _process_digit_article(text: str) -> str:
    """vqaEval ``processDigitArticle``: lower-case, number words to digits, drop articles, contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def _clean_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, then strip: done to every answer before anything else."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the 10-choose-9 subsets of the human answers of min(#matches / 3, 1).

    A prediction given by k of 10 humans scores 0.3 (k=1), 0.6 (k=2), 0.9 (k=3), 1.0 (k>=4).
    """
    if not answers:
        raise ValueError("VQA accuracy needs at least one reference answer, got none")
    accuracies = []
    for left_out in range(len(answers)):
        others = answers[:left_out] + answers[left_out + 1 :]
        matches = sum(1 for answer in others if answer == prediction)
        accuracies.append(min(1.0, matches / 3))
    return sum(accuracies) / len(accuracies)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA v2 accuracy of one prediction against its (ten) human answers, in [0, 1].

    Exactly vqaEval.py's order of operations: newlines/tabs become spaces and both sides are stripped;
    then, only if the stripped answers are not all the same string, the answers and the prediction go
    through punctuation processing and digit/article/contraction processing. So against ten "yes",
    "Yes" and "yes." score 0, while against nine "yes" and one "no" they score 1.
    """
    gts = [_clean_whitespace(answer) for answer in answers]
    pred = _clean_whitespace(prediction)
    if len(set(gts)) > 1:
        gts = [_process_digit_article(_process_punctuation(gt, VQA_COMMA_STRIP)) for gt in gts]
        pred = _process_digit_article(_process_punctuation(pred, VQA_COMMA_STRIP))
    return _leave_one_out_accuracy(pred, gts)


def evalai_normalize(answer: str) -> str:
    """The EvalAI/MMF answer processor (``EvalAIAnswerProcessor.__call__``).

    Differences from the vqaEval.py path in :func:`vqa_accuracy`:

    - it always runs, on every string it is given (vqaEval only when the human answers disagree);
    - it lower-cases *first* and deletes every "," and "?" before punctuation processing, so "red,white"
      becomes "redwhite" (vqaEval: "red white") and its digit-comma rule can never fire ("1,000" still
      becomes "1000", by the deletion);
    - it splits possessives: "man's" becomes "man 's";
    - otherwise the same tables: punctuation (space-or-delete rule, period strip), number words to
      digits, articles dropped, contractions fixed.
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _clean_whitespace(text)
    text = _process_punctuation(text, EVALAI_COMMA_STRIP)
    return _process_digit_article(text)


def evalai_vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA / VizWiz accuracy as LLaVA's ``TextVQAAccuracyEvaluator`` and lmms-eval compute it.

    The prediction and every answer go through :func:`evalai_normalize`; then the same 10-choose-9
    average of min(#matches / 3, 1) as VQA v2.
    """
    return _leave_one_out_accuracy(evalai_normalize(prediction), [evalai_normalize(a) for a in answers])


def gqa_exact_match(prediction: str, answer: str) -> bool:
    """GQA accuracy of one question: LLaVA's ``convert_gqa_for_eval`` (strip, drop trailing periods,
    lower-case), then the official ``eval.py`` string equality with the gold answer."""
    return prediction.strip().rstrip(".").lower() == answer


# --- POPE -------------------------------------------------------------------------------------------------


def pope_parse(prediction: str) -> str:
    """LLaVA ``eval_pope.py``: keep the first sentence, drop commas, split on spaces; "No", "no" or
    "not" among the words means "no", anything else "yes" ("NO" and "Nope" count as "yes")."""
    text = prediction.split(".")[0] if "." in prediction else prediction
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 ("yes" is the positive class) and the ratio of "yes" predictions.

    ``predictions`` are raw model outputs (parsed with :func:`pope_parse`); ``labels`` are the gold
    "yes"/"no" (anything but "no" counts as yes, as in eval_pope.py). Precision, recall and F1 are 0
    where eval_pope.py would divide by zero.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"POPE: {len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("POPE metrics need at least one question, got none")
    pred_yes = [pope_parse(p) == "yes" for p in predictions]
    gold_yes = [label != "no" for label in labels]
    tp = sum(p and g for p, g in zip(pred_yes, gold_yes))
    fp = sum(p and not g for p, g in zip(pred_yes, gold_yes))
    tn = sum(not p and not g for p, g in zip(pred_yes, gold_yes))
    fn = sum(not p and g for p, g in zip(pred_yes, gold_yes))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(pred_yes) / len(pred_yes),
    }


# --- MME --------------------------------------------------------------------------------------------------

MME_PERCEPTION: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION: tuple[str, ...] = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)  # fmt: skip


def mme_parse(prediction: str) -> str:
    """MME ``calculation.py`` ``parse_pred_ans`` on the lower-cased answer: "yes"/"no" as is, else
    "yes" or "no" when found in the first four characters (yes first), else "other"."""
    text = prediction.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


@dataclass(frozen=True)
class MMEAnswer:
    """One MME question: its subtask, the image it belongs to (two questions per image), gold, output."""

    category: str
    image: str
    label: str
    prediction: str


def mme_scores(answers: Iterable[MMEAnswer]) -> dict[str, object]:
    """Per subtask ``acc`` and ``acc_plus`` (in %, acc+ = images whose questions are all right) and their
    sum ``score``; ``perception`` and ``cognition`` are the sums of the subtask scores present.

    Labels are compared lower-cased, as in calculation.py. A subtask outside the official lists is
    reported but counted in neither total.
    """
    per_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for a in answers:
        label = a.label.lower().strip()
        if label not in ("yes", "no"):
            raise ValueError(f"MME: gold answer must be yes or no, got {a.label!r} (image {a.image!r})")
        per_image[a.category][a.image].append(mme_parse(a.prediction) == label)
    subtasks: dict[str, dict[str, float]] = {}
    for category, images in per_image.items():
        flat = [ok for oks in images.values() for ok in oks]
        acc = 100.0 * sum(flat) / len(flat)
        acc_plus = 100.0 * sum(all(oks) for oks in images.values()) / len(images)
        subtasks[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return {
        "perception": sum(subtasks[c]["score"] for c in MME_PERCEPTION if c in subtasks),
        "cognition": sum(subtasks[c]["score"] for c in MME_COGNITION if c in subtasks),
        "subtasks": subtasks,
    }


# --- Multiple choice --------------------------------------------------------------------------------------

OPTION_LETTERS: tuple[str, ...] = ("A", "B", "C", "D", "E")


def scienceqa_parse(prediction: str, num_choices: int) -> int:
    """The chosen option index from a ScienceQA answer, or -1 (LLaVA ``eval_science_qa.py``).

    Newlines become ". "; accepted forms are a bare letter ("B"), a letter then ". " ("B. plants"),
    and "The answer is B." / "The answer is B". A letter beyond the question's choices is -1.
    """
    text = prediction.replace("\n", ". ")
    letter = "FAILED"
    if text.strip() in OPTION_LETTERS:
        letter = text.strip()
    elif len(text) >= 3 and text[0] in OPTION_LETTERS and text[1:3] == ". ":
        letter = text[0]
    elif "The answer is " in text:
        match = re.search(r"The answer is ([A-E])\.", text) or re.search(r"The answer is ([A-E])", text)
        if match:
            letter = match.group(1)
    valid = OPTION_LETTERS[:num_choices]
    return valid.index(letter) if letter in valid else -1


# VLMEvalKit's replies that mean "no answer" (mapped to the pseudo option "Z").
_MMBENCH_REFUSALS: tuple[str, ...] = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)


def mmbench_extract(prediction: str, choices: Mapping[str, str]) -> str | None:
    """The option letter a free-form MMBench answer picks, by VLMEvalKit's rules (``can_infer``), or None.

    First the letter rule: after turning ``.()[],:;!*#{}`` into spaces, exactly one of the choice letters
    must stand alone as a word ("B", "(B) cat", "Answer: B."). Then the text rule, for answers at most
    twice as long as all choice texts together: exactly one choice text must occur in the lower-cased
    answer. A refusal, or a lone "Z", gives "Z". Where VLMEvalKit would ask an LLM judge (or, without
    one, pick a random letter), this returns None and the answer counts as wrong.
    """
    if any(refusal in prediction for refusal in _MMBENCH_REFUSALS):
        return "Z"
    text = prediction
    for char in ".()[],:;!*#{}":
        text = text.replace(char, " ")
    words = text.split()
    found = [letter for letter in choices if letter in words]
    if len(found) == 1:
        return found[0]
    if not found and "Z" in words:
        return "Z"
    lowered = prediction.lower()
    if len(lowered) > 2 * sum(len(str(text)) for text in choices.values()):
        return None
    hits = [letter for letter, text in choices.items() if str(text).lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def circular_accuracy(correct_by_question: Mapping[str, Sequence[bool]]) -> float:
    """MMBench CircularEval: a question counts only if every circular shift of its options was right."""
    if not correct_by_question:
        raise ValueError("circular accuracy needs at least one question, got none")
    return sum(all(passes) for passes in correct_by_question.values()) / len(correct_by_question)


# --- Short free-form answers (Clotho-AQA, the toy world) --------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lower-case, strip whitespace and trailing sentence punctuation: "Yes." -> "yes"."""
    return text.strip().lower().rstrip(".!?,;:").strip()


def exact_match(prediction: str, answer: str) -> bool:
    """Equality after :func:`normalize_answer` on both sides."""
    return normalize_answer(prediction) == normalize_answer(answer)


def majority_answer(answers: Sequence[str]) -> str:
    """The most frequent normalised answer; ties go to the one listed first (Clotho-AQA has 3 raters)."""
    if not answers:
        raise ValueError("majority_answer needs at least one answer, got none")
    counts = Counter(normalize_answer(a) for a in answers)
    best = max(counts.values())
    return next(normalize_answer(a) for a in answers if counts[normalize_answer(a)] == best)


def yes_no(prediction: str) -> str | None:
    """ "yes" or "no" when the answer's first word is one of them ("No, it is not." -> "no"), else None."""
    words = normalize_answer(prediction).replace(",", " ").split()
    return words[0] if words and words[0] in ("yes", "no") else None
