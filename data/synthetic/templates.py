"""Every fixed piece of text the generator can emit.

Kept in one module so the vocabulary (vocab.py) is derived from it by
construction, and small and templated so a tiny model can learn the language.
`{slot}`s are filled with shape attributes or with other entries of this module.
"""

ABSENT_KINDS = ("star",)  # named only in false-premise queries, never drawn
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five"}
AND, OR, LIST_SEP = "and", "or", ", "
# Position of a shape's centre on a 3x3 grid (row, column).
POSITIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
EXTREMES = {"largest": "large", "smallest": "small"}  # superlative -> winning size class
DIRECTIONS = ("left of", "right of", "above", "below")
# Function clause -> (kinds it is true of, the fact the reasoning states).
FUNCTIONS = {
    "could roll": (("circle", "ring"), "Circles and rings can roll."),
    "has no corners": (("circle", "ring"), "Circles and rings have no corners."),
    "has three corners": (("triangle",), "Triangles have three corners."),
    "has four corners": (("square",), "Squares have four corners."),
    "has a hole in the middle": (("ring",), "Rings have a hole in the middle."),
    "has straight sides": (("square", "triangle"), "Squares and triangles have straight sides."),
}

# Noun phrases. `what` is the thing a query asks for; it is both spoken in the
# question and restated in the reasoning.
SHAPE = "shape"
COLOURED_SHAPE = "{colour} shape"
SHAPE_THAT = "shape that {clause}"
THE = "the {noun}"
EVERY = "every {noun}"
RELATION_WHAT = "the {thing} {direction} the {anchor}"

# Questions. Noun phrases (no final punctuation) count as short phrases,
# the others as sentences (Sample.is_sentence).
ATTRIBUTE_Q = ("{what}",)
FUNCTION_Q = ("{what}", "Which shape {clause}?", "Find {what}.")
SUPERLATIVE_Q = ("{what}", "Which is {what}?")
RELATION_Q = ("{what}", "Which {thing} is {direction} the {anchor}?")
RELATION_ANY_Q = ("What is {direction} the {anchor}?",)  # only when the thing is any shape
MULTI_Q = ("{what}", "Find {what}.")

# Reasoning sentences.
ASK = "The question asks for {what}."
NAME = "the {size} {colour} {kind} at the {position}"
FOUND_ONE = "There is one: {names}."
FOUND_MANY = "There are {count}: {names}."
ABSENT = "There is no {what} in the image."
MEMBERS = "The {group} are {names}."
WINNER = "The {extreme} is {name}."
ANCHOR_AT = "The {anchor} is at the {position}."
NEAREST = "The nearest {thing} {direction} it is {name}."
NONE_BEYOND = "There is no {thing} {direction} it."

# Alignment instructions (make-tiny's LM pretraining): what a scene holds, whole or by group.
DESCRIBE_Q = "Describe the image."
LIST_Q = "List {what}."

# The answer after </think> when there is nothing to segment.
NO_TARGET_ANSWER = "No such object."
