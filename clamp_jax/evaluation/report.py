"""Evaluation reports: the printed table, eval_results.json, eval_results.md and a PNG bar chart.

`results` maps each dataset to its metrics (fractions in [0, 1]) and counts (`num_images`, ...).
`primary` maps each dataset to the metric its benchmark reports, and the summary averages those.
"""

from __future__ import annotations

import json
import os

from PIL import Image, ImageDraw, ImageFont

# Column order of the tables; metrics not listed here follow in alphabetical order.
METRIC_ORDER = ('top1', 'top5', 'mean_per_class', 'roc_auc', 'i2t_r1', 'i2t_r5', 'i2t_r10',
                't2i_r1', 't2i_r5', 't2i_r10', 'mean_recall')
COUNT_COLUMNS = {'num_images': 'images', 'num_captions': 'captions',
                 'num_unreadable': 'unreadable'}


def _columns(results: dict[str, dict]) -> tuple[list[str], list[str]]:
  """Metric columns and count columns that occur in any dataset, in display order."""
  present = {key for row in results.values() for key in row}
  extra = sorted(present - set(METRIC_ORDER) - set(COUNT_COLUMNS))
  metric_columns = [key for key in METRIC_ORDER if key in present] + extra
  count_columns = [key for key in COUNT_COLUMNS if key in present]
  return metric_columns, count_columns


def mean_score(results: dict[str, dict], primary: dict[str, str]) -> float:
  """Return the mean of the datasets' primary metrics."""
  return sum(results[name][primary[name]] for name in results) / len(results)


def format_table(results: dict[str, dict], primary: dict[str, str]) -> str:
  """Format a fixed-width text table of every metric, and the mean score when there are several datasets.

  With the digits alone this is the table that training has always printed.
  """
  metric_columns, count_columns = _columns(results)
  name_width = max([12] + [len(name) for name in results])
  headers = [COUNT_COLUMNS.get(key, key) for key in metric_columns + count_columns]
  widths = [max(7, len(header)) for header in headers]
  lines = [' '.join([f'{"dataset":<{name_width}}'] +
                    [f'{header:>{width}}' for header, width in zip(headers, widths)])]
  for name, row in results.items():
    cells = [f'{name:<{name_width}}']
    for key, width in zip(metric_columns + count_columns, widths):
      value = row.get(key)
      if value is None:
        cells.append(f'{"-":>{width}}')
      elif key in COUNT_COLUMNS:
        cells.append(f'{int(value):>{width}d}')
      else:
        cells.append(f'{value:>{width}.4f}')
    lines.append(' '.join(cells))
  if len(results) > 1:
    lines.append(f'mean score over {len(results)} datasets: {mean_score(results, primary):.4f}')
  return '\n'.join(lines)


def format_markdown(results: dict[str, dict], primary: dict[str, str]) -> str:
  """Format a Markdown table: a row per dataset with its reported metric and score, then the mean."""
  metric_columns, count_columns = _columns(results)
  headers = ['dataset', 'metric', 'score'] + metric_columns + [
      COUNT_COLUMNS[key] for key in count_columns]
  lines = ['| ' + ' | '.join(headers) + ' |',
           '| --- | --- | ' + ' | '.join('---:' for _ in headers[2:]) + ' |']
  for name, row in results.items():
    cells = [name, primary[name], f'{row[primary[name]]:.4f}']
    cells += ['' if row.get(key) is None else f'{row[key]:.4f}' for key in metric_columns]
    cells += ['' if row.get(key) is None else str(int(row[key])) for key in count_columns]
    lines.append('| ' + ' | '.join(cells) + ' |')
  blanks = [''] * (len(headers) - 3)
  lines.append('| ' + ' | '.join(['**mean**', '', f'**{mean_score(results, primary):.4f}**']
                                  + blanks) + ' |')
  return '\n'.join(lines) + '\n'


def draw_bar_chart(results: dict[str, dict], primary: dict[str, str]) -> Image.Image:
  """Draw horizontal bars of each dataset's score and of the mean, on a 0 to 1 scale."""
  rows = [(name, primary[name], results[name][primary[name]]) for name in results]
  rows.append(('mean', 'primary metrics', mean_score(results, primary)))
  font = ImageFont.load_default()
  label_width, bar_width, row_height, margin = 260, 420, 22, 12
  width = label_width + bar_width + 80
  height = 2 * margin + row_height * (len(rows) + 1)
  image = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(image)
  draw.text((margin, margin), 'zero-shot evaluation (score: each dataset\'s metric)',
            fill='black', font=font)
  for index, (name, metric, score) in enumerate(rows, start=1):
    top = margin + index * row_height
    draw.text((margin, top + 4), f'{name} ({metric})', fill='black', font=font)
    length = int(round(bar_width * min(max(score, 0.0), 1.0)))
    colour = (90, 90, 90) if name == 'mean' else (66, 120, 190)
    draw.rectangle((label_width, top + 3, label_width + max(length, 1), top + row_height - 3),
                   fill=colour)
    draw.text((label_width + length + 6, top + 4), f'{score:.3f}', fill='black', font=font)
  draw.line((label_width, margin + row_height, label_width, height - margin), fill='black')
  draw.line((label_width + bar_width, margin + row_height, label_width + bar_width,
             height - margin), fill=(200, 200, 200))
  return image


def write_reports(results: dict[str, dict], primary: dict[str, str], workdir: str) -> list[str]:
  """Write WORKDIR/eval_results.json, .md and .png; returns their paths."""
  base = os.path.join(workdir, 'eval_results')
  with open(base + '.json', 'w', encoding='utf-8') as file:
    json.dump(results, file, indent=2)
  with open(base + '.md', 'w', encoding='utf-8') as file:
    file.write(format_markdown(results, primary))
  draw_bar_chart(results, primary).save(base + '.png')
  return [base + '.json', base + '.md', base + '.png']
