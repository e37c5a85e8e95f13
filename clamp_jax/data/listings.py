"""Sample lists of image folders and of CSV/TSV caption files.

Image folder: one subfolder per class under the root, images anywhere below it. Class names are
the subfolder names, or come from a class-names file with one line per class. Such a line is
either `folder<TAB>name`, or a bare name given in sorted subfolder order.

CSV/TSV: rows of `path<TAB>caption` (`.csv` files use commas). A first row `path,caption` is
taken as a header. Relative paths are relative to the file's folder. Captions stay bytes until
the decoder checks that they are UTF-8.
"""

from __future__ import annotations

import csv
import os

IMAGE_FILE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')
_HEADER = ('path', 'caption')


def list_image_folder(root: str, class_names_file: str = '') -> tuple[list[tuple[str, int]],
                                                                       list[str]]:
  """List `(image_path, class_index)` pairs in sorted order, and the class names.

  Raises:
    FileNotFoundError: when `root` is not a folder or contains no image.
    ValueError: when the class-names file does not match the subfolders.
  """
  root = os.path.expanduser(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'Image folder {root!r} does not exist or is not a folder.')
  folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
  if not folders:
    raise FileNotFoundError(f'Image folder {root!r} has no class subfolders.')
  names = read_class_names(class_names_file, folders) if class_names_file else folders

  items = []
  for index, folder in enumerate(folders):
    for directory, subfolders, files in os.walk(os.path.join(root, folder)):
      subfolders.sort()
      for name in sorted(files):
        if name.lower().endswith(IMAGE_FILE_EXTENSIONS):
          items.append((os.path.join(directory, name), index))
  if not items:
    raise FileNotFoundError(
        f'Image folder {root!r} has no image files ({", ".join(IMAGE_FILE_EXTENSIONS)}) in its '
        'class subfolders.')
  return items, names


def read_class_names(path: str, folders: list[str]) -> list[str]:
  """Read the class names of `folders` (sorted subfolder names) from a class-names file."""
  with open(os.path.expanduser(path), encoding='utf-8') as file:
    lines = [line.rstrip('\n') for line in file if line.strip()]
  if any('\t' in line for line in lines):
    mapping = dict(line.split('\t', 1) for line in lines)
    missing = [folder for folder in folders if folder not in mapping]
    if missing:
      raise ValueError(f'Class-names file {path!r} has no line for the subfolders {missing[:5]}.')
    return [mapping[folder].strip() for folder in folders]
  if len(lines) != len(folders):
    raise ValueError(
        f'Class-names file {path!r} has {len(lines)} names for {len(folders)} subfolders; give '
        'one name per subfolder in sorted order, or folder<TAB>name lines.')
  return [line.strip() for line in lines]


def csv_delimiter(path: str) -> str:
  """Return ',' for a .csv file and a tab otherwise."""
  return ',' if path.lower().endswith('.csv') else '\t'


def read_caption_table(path: str) -> list[tuple[str, bytes | None]]:
  """Read `(image_path, caption_bytes)` rows; the caption is None when a row has no second column.

  Raises:
    FileNotFoundError: when the file does not exist or has no rows.
  """
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Caption file {path!r} does not exist.')
  folder = os.path.dirname(os.path.abspath(path))
  rows = []
  # surrogateescape keeps bytes that are not UTF-8, so that such captions are counted as
  # caption_not_utf8 per row instead of failing the whole file.
  with open(path, encoding='utf-8', errors='surrogateescape', newline='') as file:
    for number, row in enumerate(csv.reader(file, delimiter=csv_delimiter(path))):
      if not row or not row[0].strip():
        continue
      if number == 0 and tuple(field.strip().lower() for field in row[:2]) == _HEADER:
        continue
      image_path = os.path.join(folder, os.path.expanduser(row[0].strip()))
      caption = row[1].encode('utf-8', 'surrogateescape') if len(row) > 1 else None
      rows.append((image_path, caption))
  if not rows:
    raise FileNotFoundError(f'Caption file {path!r} has no path,caption rows.')
  return rows
