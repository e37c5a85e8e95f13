"""The registry of evaluation benchmarks: where each is read, its class names, prompts and metric.

A benchmark is read from `config.eval.data_dir/<name>/` when that folder exists, and otherwise
from TensorFlow Datasets when it has a TFDS name (`config.eval.source` can force either).

Image-folder layout: one subfolder per class, images anywhere below it. When the folder has a
subfolder named after the benchmark's `folder_split` ('test', or 'val' for ImageNet), that
subfolder is the class root. Class names come from a `classnames.txt` next to the class
subfolders or in the benchmark folder: `folder<TAB>name` lines, or one bare name per class in
sorted subfolder order (TFDS: label order). Without that file they come from the subfolder names
or the TFDS ClassLabel names, with '_' read as a space and `name_map` applied.

Caption datasets for retrieval hold `captions.json` (COCO captions or Karpathy-split JSON),
`captions.csv` or `captions.tsv` (image path, caption; one row per caption).

Any name that is not registered is read as a generic folder under `data_dir`, with `GENERIC`
templates and top-1 accuracy. An entry that contains a path separator is the folder itself.
"""

from __future__ import annotations

import dataclasses
import os
import re

from clamp_jax.evaluation import templates

CLASSIFICATION = 'classification'
RETRIEVAL = 'retrieval'
DIGITS = 'digits'

# Primary metrics: the number a benchmark reports, which the summary table averages.
TOP1 = 'top1'
MEAN_PER_CLASS = 'mean_per_class'
ROC_AUC = 'roc_auc'
MEAN_RECALL = 'mean_recall'

CLASS_NAMES_FILE = 'classnames.txt'
TEMPLATES_FILE = 'templates.txt'
CAPTION_FILES = ('captions.json', 'captions.csv', 'captions.tsv')


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """Reading, prompting and scoring settings of one evaluation dataset."""

  name: str
  title: str
  task: str = CLASSIFICATION
  templates: tuple[str, ...] = templates.GENERIC
  metric: str = TOP1
  tfds_name: str = ''
  tfds_split: str = 'test'
  tfds_image_key: str = 'image'
  tfds_label_key: str = 'label'
  folder_split: str = 'test'
  # The source's own labels are ids (WordNet ids, country codes, numbers), so a classnames.txt
  # is required.
  needs_class_names_file: bool = False
  # A sibling benchmark folder whose classnames.txt applies when this one has none (the
  # ImageNet variants share ImageNet's WordNet ids).
  class_names_fallback: str = ''
  # Source label name -> class name, for labels that are numbers or terse words.
  name_map: tuple[tuple[str, str], ...] = ()
  split_camel_case: bool = False
  # Score only the classes that occur in the labels: ImageNet-A and -R in TFDS use the
  # 1000-class label space, but the benchmarks are 200-way.
  present_classes_only: bool = False


def _entry(name: str, title: str, **kwargs) -> Benchmark:
  return Benchmark(name=name, title=title, **kwargs)


_IMAGENET = dict(needs_class_names_file=True, class_names_fallback='imagenet')

REGISTRY: dict[str, Benchmark] = {benchmark.name: benchmark for benchmark in (
    _entry('digits', 'scikit-learn digits (held out)', task=DIGITS),
    _entry('imagenet', 'ImageNet-1k', templates=templates.OBJECTS, tfds_name='imagenet2012',
           tfds_split='validation', folder_split='val', **_IMAGENET),
    _entry('imagenet_v2', 'ImageNet-V2', templates=templates.OBJECTS, tfds_name='imagenet_v2',
           **_IMAGENET),
    _entry('imagenet_sketch', 'ImageNet-Sketch', templates=templates.SKETCHES,
           tfds_name='imagenet_sketch', **_IMAGENET),
    _entry('imagenet_a', 'ImageNet-A', templates=templates.OBJECTS, tfds_name='imagenet_a',
           present_classes_only=True, **_IMAGENET),
    _entry('imagenet_r', 'ImageNet-R', templates=templates.RENDITIONS, tfds_name='imagenet_r',
           present_classes_only=True, **_IMAGENET),
    # NOTE: CLIP reports 11-point mAP over VOC2007's multi-label annotations. An image folder
    # gives each image one class, so this is top-1 accuracy and not comparable to that number.
    _entry('voc2007', 'VOC2007', templates=templates.OBJECTS),
    _entry('gtsrb', 'GTSRB', templates=templates.TRAFFIC_SIGNS, needs_class_names_file=True),
    _entry('country211', 'Country211', templates=templates.COUNTRIES,
           needs_class_names_file=True),
    _entry('rendered_sst2', 'Rendered-SST2', templates=templates.SENTIMENT),
    _entry('kitti_distance', 'KITTI-distance', templates=templates.DRIVING_SCENES,
           needs_class_names_file=True),
    _entry('eurosat', 'EuroSAT', templates=templates.SATELLITE, split_camel_case=True),
    _entry('resisc45', 'RESISC45', templates=templates.AERIAL),
    _entry('caltech101', 'Caltech-101', templates=templates.OBJECTS, metric=MEAN_PER_CLASS,
           tfds_name='caltech101'),
    _entry('cifar10', 'CIFAR-10', templates=templates.SMALL_IMAGES, tfds_name='cifar10'),
    _entry('cifar100', 'CIFAR-100', templates=templates.SMALL_IMAGES, tfds_name='cifar100'),
    _entry('dtd', 'DTD', templates=templates.TEXTURES, tfds_name='dtd'),
    _entry('fgvc_aircraft', 'FGVC-Aircraft', templates=templates.AIRCRAFT,
           metric=MEAN_PER_CLASS),
    _entry('food101', 'Food-101', templates=templates.FOOD, tfds_name='food101',
           tfds_split='validation'),
    _entry('mnist', 'MNIST', templates=templates.HANDWRITTEN_DIGITS, tfds_name='mnist'),
    _entry('flowers102', 'Flowers-102', templates=templates.FLOWERS, metric=MEAN_PER_CLASS,
           tfds_name='oxford_flowers102'),
    _entry('oxford_pets', 'Oxford-IIIT Pets', templates=templates.PETS, metric=MEAN_PER_CLASS,
           tfds_name='oxford_iiit_pet'),
    _entry('pcam', 'PatchCamelyon', templates=templates.HISTOPATHOLOGY,
           tfds_name='patch_camelyon',
           name_map=(('0', 'healthy lymph node tissue'),
                     ('1', 'lymph node tissue with metastatic tumor cells'))),
    _entry('stanford_cars', 'Stanford Cars', templates=templates.CARS, tfds_name='cars196'),
    _entry('fer2013', 'FER-2013', templates=templates.FACIAL_EXPRESSIONS,
           name_map=(('angry', 'anger'), ('happy', 'happiness'), ('neutral', 'no emotion'),
                     ('sad', 'sadness'))),
    _entry('hateful_memes', 'Hateful Memes', templates=templates.MEMES, metric=ROC_AUC,
           name_map=(('0', 'harmless meme'), ('1', 'hateful meme'))),
    _entry('mscoco', 'MS-COCO (5k test)', task=RETRIEVAL, metric=MEAN_RECALL),
    _entry('flickr30k', 'Flickr30k (1k test)', task=RETRIEVAL, metric=MEAN_RECALL),
)}

ELEVATER = ('voc2007', 'gtsrb', 'country211', 'rendered_sst2', 'kitti_distance', 'eurosat',
            'resisc45', 'caltech101', 'cifar10', 'cifar100', 'dtd', 'fgvc_aircraft', 'food101',
            'mnist', 'flowers102', 'oxford_pets', 'pcam', 'stanford_cars', 'fer2013',
            'hateful_memes')
IMAGENET_VARIANTS = ('imagenet_v2', 'imagenet_sketch', 'imagenet_a', 'imagenet_r')
# Every classification benchmark but the digits: `config.eval.datasets=('all',)` expands to this.
ALL_CLASSIFICATION = ('imagenet',) + IMAGENET_VARIANTS + ELEVATER
SUITES = {'all': ALL_CLASSIFICATION, 'elevater': ELEVATER, 'imagenet_variants': IMAGENET_VARIANTS}


@dataclasses.dataclass(frozen=True)
class ResolvedBenchmark:
  """A benchmark with the folder it is read from (which may not exist when TFDS is used)."""

  benchmark: Benchmark
  folder: str


def expand_names(entries) -> list[str]:
  """Expand suite names ('all', 'elevater', 'imagenet_variants') and drop repeats, keeping order."""
  names = []
  for entry in entries:
    for name in SUITES.get(entry, (entry,)):
      if name not in names:
        names.append(name)
  return names


def resolve(entry: str, data_dir: str) -> ResolvedBenchmark:
  """Find the benchmark and folder of one `config.eval.datasets` entry.

  Raises:
    FileNotFoundError: for an unregistered name with no folder under `data_dir`.
  """
  data_dir = os.path.expanduser(data_dir) if data_dir else ''
  if entry in REGISTRY:
    folder = os.path.join(data_dir, entry) if data_dir else ''
    return ResolvedBenchmark(REGISTRY[entry], folder)

  if os.sep in entry or entry.startswith('~'):
    folder = os.path.expanduser(entry)
  elif data_dir:
    folder = os.path.join(data_dir, entry)
  else:
    raise FileNotFoundError(
        f'{entry!r} is not a registered benchmark and config.eval.data_dir is empty, so there '
        f'is no {entry}/ folder to read (registered: {", ".join(sorted(REGISTRY))})')
  if not os.path.isdir(folder):
    raise FileNotFoundError(
        f'{entry!r} is not a registered benchmark and {folder!r} is not a folder (registered: '
        f'{", ".join(sorted(REGISTRY))})')
  name = os.path.basename(os.path.normpath(folder))
  has_captions = any(os.path.isfile(os.path.join(folder, file)) for file in CAPTION_FILES)
  task = RETRIEVAL if has_captions else CLASSIFICATION
  metric = MEAN_RECALL if has_captions else TOP1
  return ResolvedBenchmark(Benchmark(name=name, title=name, task=task, metric=metric), folder)


def display_name(raw: str, benchmark: Benchmark) -> str:
  """Turn a folder or TFDS label name into a class name: `name_map`, then '_' read as a space."""
  mapped = dict(benchmark.name_map).get(raw)
  if mapped is not None:
    return mapped
  name = raw.replace('_', ' ')
  if benchmark.split_camel_case:
    name = re.sub(r'(?<=[a-z])(?=[A-Z])', ' ', name).lower()
  return ' '.join(name.split())


def check_data(names, data_dir: str, source: str) -> None:
  """Fail before any evaluation when a benchmark's folder or caption file is missing.

  TFDS datasets are not checked here, so a missing one fails only when it is opened.

  Raises:
    FileNotFoundError: naming every benchmark without data.
  """
  problems = []
  for entry in names:
    try:
      resolved = resolve(entry, data_dir)
    except FileNotFoundError as error:
      problems.append(str(error))
      continue
    benchmark, folder = resolved.benchmark, resolved.folder
    has_folder = bool(folder) and os.path.isdir(folder)
    where = folder or 'config.eval.data_dir (empty)'
    if benchmark.task == RETRIEVAL:
      if not has_folder or not any(os.path.isfile(os.path.join(folder, name))
                                   for name in CAPTION_FILES):
        problems.append(f'{benchmark.name}: no {" or ".join(CAPTION_FILES)} in {where}')
    elif benchmark.task == CLASSIFICATION and not has_folder:
      if source == 'folder' or not benchmark.tfds_name:
        problems.append(f'{benchmark.name}: {where} is not a folder')
  if problems:
    raise FileNotFoundError('Missing evaluation data: ' + '; '.join(problems) +
                            '. README, "Evaluation benchmarks", shows the layout.')
