"""Task plugins used by tests/test_tasks.py (resolved like reward plugins: `tests.task_plugins:NAME`)."""

from nanoseek.tasks import Task

WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")


class Echo(Task):
    """A text task: say a word back in <answer> tags. The even words train, the odd ones are held out."""

    name = "echo"
    held_out = True
    rewards = (("tests.reward_plugins:uses_columns", 1.0), ("format", 0.5))

    def __init__(self, upper: bool = False) -> None:
        self.upper = upper

    def items(self, split="train", n=None, seed=0):
        words = WORDS[0::2] if split == "train" else WORDS[1::2]
        words = [w.upper() if self.upper else w for w in words][:n]
        return [{"id": f"echo-{w}", "prompt": f"Say {w}.", "answer": w} for w in words]

    def verify(self, item, output):
        return 1.0 if self.normalize(output) == item["answer"] else 0.0


ECHO = Echo()  # a plugin may name an instance (no options), a Task subclass or a function returning a Task


def shouting_echo(**options):
    return Echo(upper=True, **options)


def not_a_task():
    return 42


class Prose(Echo):
    output = "prose"  # not an output kind


# ------------------------------------------------------------------------------------------------------------
# a task whose output is an image (text-to-image), scored by a rule-based detector

COLORS = {"red": 0, "green": 1, "blue": 2}


class ColorSquares(Task):
    """"Draw a red square.": the detector reads the image's dominant colour channel (mean over the pixels; a
    channel must lead the others by 64 levels to count as a colour, so grey and white images show nothing)."""

    name = "color-squares"
    output = "image"
    instruction = ""  # no <answer> tags: the output is a picture
    formats = ("chat",)
    held_out = True

    def items(self, split="train", n=None, seed=0):
        colors = list(COLORS)[:2] if split == "train" else list(COLORS)
        return [{"id": f"sq-{c}", "prompt": f"Draw a {c} square.", "color": c} for c in colors][:n]

    def detect(self, image):
        from PIL import ImageStat

        means = ImageStat.Stat(image.convert("RGB")).mean
        top = max(range(3), key=lambda i: means[i])
        if all(means[top] - means[i] >= 64 for i in range(3) if i != top):
            return next(c for c, i in COLORS.items() if i == top)
        return None

    def verify(self, item, output):
        return 1.0 if self.detect(output) == item["color"] else 0.0

    def normalize(self, output):
        return self.detect(output)
