"""Zero-shot prompt templates, one set per image domain.

Each template has one `{}` field for the class name. A class's classifier row is the mean of its
normalised template embeddings, so a set mixes phrasings that a caption of such an image could
plausibly use. A `templates.txt` file in a dataset's folder (one template per line) replaces the
set of its benchmark.
"""

from __future__ import annotations

GENERIC = (
    'a photo of a {}.',
    'a picture showing a {}.',
    'an image of the {}.',
)

OBJECTS = (
    'a photo of a {}.',
    'a snapshot with a {} in it.',
    'an everyday scene with a {}.',
    'a {} seen up close.',
    'a {} photographed from far away.',
    'a grainy picture of a {}.',
)

SMALL_IMAGES = (
    'a small photo of a {}.',
    'a tiny low-resolution image of a {}.',
    'a blurry thumbnail of a {}.',
    'a photo of a {}.',
)

SKETCHES = (
    'a pencil sketch of a {}.',
    'a black and white drawing of a {}.',
    'a rough doodle of a {}.',
    'a line drawing of the {}.',
)

RENDITIONS = (
    'a painting of a {}.',
    'a cartoon of a {}.',
    'a {} made of paper, folded as origami.',
    'a sculpture of a {}.',
    'a tattoo that shows a {}.',
    'graffiti showing a {}.',
    'a {} in a video game.',
    'a stuffed toy {}.',
)

TRAFFIC_SIGNS = (
    'a traffic sign that means {}.',
    'a road sign: {}.',
    'a photo of the "{}" traffic sign.',
    'a street sign showing {}.',
)

COUNTRIES = (
    'a photo taken in {}.',
    'a street scene in {}.',
    'a landscape photographed in {}.',
    'a picture from {}.',
)

SENTIMENT = (
    'a {} movie review.',
    'the text of a {} review of a film.',
    'a sentence that expresses a {} opinion.',
)

# KITTI-distance class names are phrases about the nearest vehicle, such as 'a car right next to
# the camera', so these templates only frame the scene.
DRIVING_SCENES = (
    'a street photo with {}.',
    'a view from a car, with {}.',
    '{}.',
)

SATELLITE = (
    'a satellite image of {}.',
    'a satellite photo showing {}.',
    'an overhead view of {} from space.',
)

AERIAL = (
    'an aerial photo of a {}.',
    'a remote sensing image of a {}.',
    'a {} seen from above.',
)

TEXTURES = (
    'a {} texture.',
    'a close-up of a {} surface.',
    'a pattern that looks {}.',
    'a {} material.',
)

AIRCRAFT = (
    'a photo of a {}, an aircraft.',
    'a {} airplane.',
    'the aircraft model {}.',
)

FOOD = (
    'a photo of {}, a dish.',
    'a plate of {}.',
    'a serving of {} on a table.',
)

HANDWRITTEN_DIGITS = (
    'a handwritten digit {}.',
    'the number {} written by hand.',
    'a scanned image of the digit {}.',
)

FLOWERS = (
    'a photo of a {}, a flower.',
    'a {} in bloom.',
    'a close-up of a {} flower.',
)

PETS = (
    'a photo of a {}, a pet.',
    'a {}, a breed of cat or dog.',
    'a pet {} at home.',
)

HISTOPATHOLOGY = (
    'a histopathology slide showing {}.',
    'a microscope image of {}.',
    'a stained tissue patch with {}.',
)

CARS = (
    'a photo of a {}, a car.',
    'a {} parked on the street.',
    'a {} on the road.',
)

FACIAL_EXPRESSIONS = (
    'a face showing {}.',
    'a facial expression of {}.',
    'a close-up of a person whose face shows {}.',
)

MEMES = (
    'a {}.',
    'an internet {} with text on it.',
    'an image of a {}.',
)
