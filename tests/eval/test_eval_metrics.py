"""Hand-checked cases for the benchmark metrics, quirks of the official scripts included.

VQA accuracy of a prediction matched by k of the 10 human answers, averaged over the 10 leave-one-out
subsets of 9 (each scoring min(matches / 3, 1)):
  k=1: (1*min(0/3,1) + 9*min(1/3,1)) / 10 = 0.3
  k=2: (2*(1/3) + 8*(2/3)) / 10 = 0.6
  k=3: (3*(2/3) + 7*1) / 10 = 0.9
  k>=4: every subset keeps >= 3 matches -> 1.0
"""

from __future__ import annotations

import pytest

from mm_llama.eval.metrics import (
    MMEAnswer,
    circular_accuracy,
    evalai_normalize,
    evalai_vqa_accuracy,
    exact_match,
    gqa_exact_match,
    majority_answer,
    mmbench_extract,
    mme_parse,
    mme_scores,
    pope_metrics,
    pope_parse,
    scienceqa_parse,
    vqa_accuracy,
    yes_no,
)


def test_leave_one_out_table() -> None:
    others = ["cat"] * 10
    for k, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["dog"] * k + others[k:]
        # k < 10 means two distinct strings, so processing runs; "dog" stays "dog".
        assert vqa_accuracy("dog", answers) == pytest.approx(expected), k


def test_all_identical_answers_skip_processing() -> None:
    # All ten "yes": len(set) == 1, so no punctuation / case processing at all.
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0  # case matters here
    assert vqa_accuracy("yes.", ["yes"] * 10) == 0.0  # period not stripped here
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0  # newline -> space, then strip: always done
    # One dissenting "no": processing runs on all, "Yes." -> "yes" which 9 humans said -> 1.0.
    assert vqa_accuracy("Yes.", ["yes"] * 9 + ["no"]) == 1.0
    assert vqa_accuracy("no", ["yes"] * 9 + ["no"]) == pytest.approx(0.3)  # k=1


def test_number_words() -> None:
    # "two" -> "2" on both sides: 5 "two" + 4 "2" become 9 "2"; "3" is k=1.
    answers = ["two"] * 5 + ["2"] * 4 + ["3"]
    assert vqa_accuracy("2", answers) == 1.0
    assert vqa_accuracy("two", answers) == 1.0
    assert vqa_accuracy("Two", answers) == 1.0
    assert vqa_accuracy("3", answers) == pytest.approx(0.3)
    # "none" and "zero" both map to "0".
    assert vqa_accuracy("zero", ["none"] * 3 + ["1"] * 7) == pytest.approx(0.9)


def test_thousands_comma() -> None:
    # "1,000" has digit-comma-digit, so every mark is deleted (not blanked): "1000". 2 + 1 = 3 -> 0.9.
    answers = ["1,000"] * 2 + ["1000"] + ["thousand"] * 7
    assert vqa_accuracy("1000", answers) == pytest.approx(0.9)
    assert vqa_accuracy("1,000", answers) == pytest.approx(0.9)
    assert vqa_accuracy("1 000", answers) == 0.0


def test_comma_between_words_becomes_space() -> None:
    # No digits around the comma and no space next to it: "," -> " ", "red,white" -> "red white".
    answers = ["red white"] * 3 + ["red"] * 7
    assert vqa_accuracy("red,white", answers) == pytest.approx(0.9)
    # With a space after it the mark is deleted: "red, white" -> "red white" too.
    assert vqa_accuracy("red, white", answers) == pytest.approx(0.9)


def test_contractions() -> None:
    # "dont" -> "don't"; the apostrophe is not a punctuation mark here, so "don't" stays. k=3 -> 0.9.
    answers = ["don't"] * 2 + ["dont"] + ["no"] * 7
    assert vqa_accuracy("dont", answers) == pytest.approx(0.9)
    assert vqa_accuracy("don't", answers) == pytest.approx(0.9)
    assert vqa_accuracy("no", answers) == 1.0  # k=7


def test_articles() -> None:
    # "a dog" and "the dog" -> "dog": 2 + 2 = 4 matches -> 1.0.
    answers = ["dog"] * 2 + ["a dog"] * 2 + ["cat"] * 6
    assert vqa_accuracy("the dog", answers) == 1.0
    assert vqa_accuracy("A dog", answers) == 1.0
    assert vqa_accuracy("dogs", answers) == 0.0


def test_periods_and_hyphens() -> None:
    # A period before a digit stays ("1.5"), one at the end goes ("1.5." -> "1.5"): k=3 -> 0.9.
    answers = ["1.5"] * 3 + ["2"] * 7
    assert vqa_accuracy("1.5", answers) == pytest.approx(0.9)
    assert vqa_accuracy("1.5.", answers) == pytest.approx(0.9)
    # "-" with no space around it is blanked: "t-shirt" -> "t shirt".
    answers = ["t-shirt"] * 3 + ["shirt"] * 7
    assert vqa_accuracy("t shirt", answers) == pytest.approx(0.9)
    assert vqa_accuracy("tshirt", answers) == 0.0


def test_period_strip_stops_after_32() -> None:
    # vqaEval passes re.UNICODE (32) as sub()'s count: of 40 periods, 8 survive.
    # The answers "........" lose all 8 periods (""), the prediction keeps 8 of its 40 ("........"), so
    # they differ: 0.0 (stripping all 40 would have made both "" and scored 0.9).
    answers = ["........"] * 3 + ["x"] * 7
    assert vqa_accuracy("." * 40, answers) == 0.0
    assert evalai_normalize("." * 40) == "." * 8


def test_evalai_normalize() -> None:
    assert evalai_normalize("Two Dogs.") == "2 dogs"
    assert evalai_normalize("1,000") == "1000"
    assert evalai_normalize("red,white") == "redwhite"  # vqaEval would give "red white"
    assert evalai_normalize("man's hat") == "man 's hat"
    assert evalai_normalize("What?") == "what"
    assert evalai_normalize("yes, it is") == "yes it is"
    assert evalai_normalize("The cat\n") == "cat"
    assert evalai_normalize("dont") == "don't"


def test_evalai_vqa_accuracy_normalizes_both_sides() -> None:
    # TextVQA-style: "Coca Cola" and "coca-cola" -> "coca cola"; 2 + 2 = 4 -> 1.0.
    answers = ["Coca Cola"] * 2 + ["coca-cola"] * 2 + ["pepsi"] * 6
    assert evalai_vqa_accuracy("COCA COLA.", answers) == 1.0
    # All identical, yet processed anyway (unlike vqa_accuracy): "Yes." matches ten "yes".
    assert evalai_vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert evalai_vqa_accuracy("unanswerable", ["unanswerable"] * 2 + ["no"] * 8) == pytest.approx(0.6)


def test_gqa_exact_match() -> None:
    assert gqa_exact_match("Yes.", "yes")
    assert gqa_exact_match(" left \n", "left")
    assert not gqa_exact_match("the left", "left")  # no article stripping in GQA


def test_pope_parse() -> None:
    assert pope_parse("Yes, there is a dog.") == "yes"
    assert pope_parse("No.") == "no"
    assert pope_parse("No, there is not.") == "no"
    assert pope_parse("There is not a dog in the image.") == "no"
    assert pope_parse("Yes. No dog though.") == "yes"  # only the first sentence counts
    assert pope_parse("NO") == "yes"  # eval_pope.py checks "No", "no", "not" only
    assert pope_parse("no,") == "no"


def test_pope_metrics() -> None:
    preds = ["Yes", "yes", "No", "No", "Yes", "no"]
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    # pred yes/gold yes: 2 (TP); pred no/gold yes: 1 (FN); pred no/gold no: 2 (TN); pred yes/gold no: 1 (FP)
    m = pope_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)
    assert pope_metrics(["no"], ["yes"])["precision"] == 0.0  # no division by zero
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        pope_metrics(["yes", "no"], ["yes"])


def test_mme_parse() -> None:
    assert mme_parse("Yes") == "yes"
    assert mme_parse("No, it is not.") == "no"
    assert mme_parse("yes.") == "yes"  # "yes" within the first 4 characters
    assert mme_parse("The answer is yes") == "other"  # "yes" too late
    assert mme_parse("Nothing") == "no"  # "no" in "noth"


def test_mme_scores() -> None:
    answers = [
        # existence: image a both right, image b one right -> acc 3/4 = 75, acc+ 1/2 = 50, score 125
        MMEAnswer("existence", "a.jpg", "Yes", "Yes"),
        MMEAnswer("existence", "a.jpg", "No", "No"),
        MMEAnswer("existence", "b.jpg", "Yes", "Yes"),
        MMEAnswer("existence", "b.jpg", "No", "Yes"),
        # code_reasoning: one image, both right -> 100 + 100 = 200
        MMEAnswer("code_reasoning", "c.png", "No", "no"),
        MMEAnswer("code_reasoning", "c.png", "Yes", "yes, it prints 3"),
    ]
    scores = mme_scores(answers)
    assert scores["subtasks"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert scores["perception"] == 125.0
    assert scores["cognition"] == 200.0
    with pytest.raises(ValueError, match="yes or no"):
        mme_scores([MMEAnswer("OCR", "d.jpg", "maybe", "yes")])


def test_scienceqa_parse() -> None:
    assert scienceqa_parse("B", 3) == 1
    assert scienceqa_parse(" C ", 3) == 2
    assert scienceqa_parse("C\n", 3) == 2  # newline -> ". ", then the "C. " rule
    assert scienceqa_parse(" C \n", 3) == -1  # " C . " fits no rule
    assert scienceqa_parse("A. plants", 2) == 0
    assert scienceqa_parse("The answer is B.", 2) == 1
    assert scienceqa_parse("I think The answer is C", 4) == 2
    assert scienceqa_parse("D", 3) == -1  # beyond the choices
    assert scienceqa_parse("plants", 2) == -1
    assert scienceqa_parse("", 2) == -1
    assert scienceqa_parse("AB", 2) == -1


def test_mmbench_extract() -> None:
    choices = {"A": "a cat", "B": "a dog", "C": "a bird"}
    assert mmbench_extract("B", choices) == "B"
    assert mmbench_extract("(C) a bird", choices) == "C"
    assert mmbench_extract("Answer: A.", choices) == "A"
    assert mmbench_extract("The animal is a dog", choices) == "B"  # text rule
    assert mmbench_extract("A or B", choices) is None  # two letters
    assert mmbench_extract("a cat and a dog", choices) is None  # two texts
    assert mmbench_extract("Cannot determine the answer", choices) == "Z"
    assert mmbench_extract("x" * 100, choices) is None  # too long for the text rule


def test_circular_accuracy() -> None:
    # q1 right in all 4 shifts, q2 wrong in one shift -> 1 of 2.
    assert circular_accuracy({"q1": [True] * 4, "q2": [True, True, False, True]}) == 0.5


def test_short_answer_helpers() -> None:
    assert exact_match("Red.", "red")
    assert not exact_match("dark red", "red")
    assert majority_answer(["Yes", "no", "yes"]) == "yes"
    assert majority_answer(["dog", "cat", "bird"]) == "dog"  # tie: the first
    assert yes_no("No, it is not.") == "no"
    assert yes_no("Maybe") is None
