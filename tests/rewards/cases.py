"""Shared response tables for the reward tests."""

# (name, response, ground truth, expected correct for extract = dapo, boxed, math_verify_full)
TABLE = [
    ("correct, Answer line", "Let me compute. 3*4 = 12.\n\nAnswer: 12", "12", True, False, True),
    ("incorrect", "Thus the total is 13.\nAnswer: 13", "12", False, False, False),
    ("boxed only", "Hence the area is $\\boxed{\\frac{3}{4}}$.", "\\frac{3}{4}", True, True, True),
    ("Answer only, LaTeX", "So we need p/q.\nAnswer: $\\dfrac{3}{4}$", "0.75", True, False, True),
    ("both, disagree (Answer right)", "I think \\boxed{7} at first, but rechecking gives 8.\nAnswer: 8", "8", True, False, False),
    ("both, disagree (boxed right)", "Answer: 8\nWait, actually it's \\boxed{7}", "7", False, True, True),
    ("malformed LaTeX", "Answer: \\frac{1}{", "\\frac{1}{2}", False, False, False),
    ("unclosed box", "so \\boxed{\\frac{1}{2}", "\\frac{1}{2}", False, False, True),
    ("units, plain", "The rope is 10 cm long.\nAnswer: 10 cm", "10", True, False, True),
    ("units, \\text", "Answer: $10\\text{ cm}$", "10", True, False, True),
    ("decimal vs fraction", "Answer: 0.5", "\\frac{1}{2}", True, False, True),
    ("fraction vs decimal", "\\boxed{\\frac{1}{2}}", "0.5", True, True, True),
    ("multiple boxed", "First \\boxed{3}, finally \\boxed{5}", "5", True, True, False),
    ("empty", "", "5", False, False, False),
    ("markdown bold", "**Answer:** 42", "42", True, False, True),
    ("x = 5", "Answer: x = 5", "5", True, False, True),
    ("thousands separator", "Answer: 1,000", "1000", True, False, True),
    ("Answer on the next line", "Answer:\n\\boxed{17}", "17", True, True, True),
    ("radicals", "Answer: $2\\sqrt{2}$", "\\sqrt{8}", True, False, True),
    ("no final answer", "I could not solve it.", "5", False, False, False),
    ("interval", "Answer: (1, 2]", "(1,2]", True, False, False),
    ("degrees", "Answer: 90^\\circ", "90", True, False, True),
    ("pi", "Answer: \\pi/2", "\\frac{\\pi}{2}", True, False, False),
    ("leading zeros", "Answer: 007", "7", True, False, True),
    ("special tokens rendered", "Answer: 12<|im_end|>", "12", False, False, False),
]
MODES = ("dapo", "boxed", "math_verify_full")
