"""Prompt material of the bundled tasks: the GSM8K chain-of-thought exemplars and the SQuAD instruction."""

from __future__ import annotations

from qtuning.config import GSM8K_MAX_FEWSHOT

# The 8 standard GSM8K chain-of-thought exemplars (Wei et al. 2022), worded as
# in the OLMES requests the data comes from ("So the answer is N."): the
# eval-set worked answers end the same way, so the model sees one format.
# qt_gsm8k.yaml reads them as its `cot_exemplars` split (see datasets.gsm8k)
# and takes the first `num_fewshot` of them.
GSM8K_COT_EXEMPLARS: tuple[tuple[str, str], ...] = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. "
        "After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. "
        "So there must have been 21 - 15 = 6. So the answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. So the answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
        "After eating 35, they had 74 - 35 = 39. So the answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. "
        "How many lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. "
        "So he gave Denny 20 - 12 = 8. So the answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
        "5 + 4 = 9. So the answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, "
        "from monday to thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. "
        "So 5 * 4 = 20 computers were added. 9 + 20 is 29. So the answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. "
        "How many golf balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. "
        "After losing 2 more, he had 35 - 2 = 33 golf balls. So the answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. "
        "So she has 23 - 15 dollars left. 23 - 15 is 8. So the answer is 8.",
    ),
)
assert len(GSM8K_COT_EXEMPLARS) == GSM8K_MAX_FEWSHOT  # EvalConfig.num_fewshot_gsm8k's upper bound

# The instruction before each SQuAD prompt. lm-eval's `description` is a
# template string, not a hook, so qt_squad.yaml holds the same text and
# tests/test_evaluate.py checks that the two agree.
SQUAD_DESCRIPTION = (
    "The following are reading comprehension questions, where the answer to each question "
    "is a segment of text from the corresponding background text.\n\n"
)


def gsm8k_exemplar_docs() -> list[dict[str, str]]:
    """The exemplars as few-shot docs: `question` and its worked answer `cot`, the fields qt_gsm8k.yaml renders."""
    return [{"question": q, "cot": a} for q, a in GSM8K_COT_EXEMPLARS]
