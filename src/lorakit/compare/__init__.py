"""The integration-independent core of ``lorakit ... compare``: which strategies, where results are kept, how
they are reported.

- :mod:`.strategies`: strategy names (fixed ones and rank families such as ``lora-r8``) with typo hints;
- :mod:`.store`: the run folder (one atomic JSON per finished strategy, so an interrupted comparison
  resumes with the strategies still missing) and the progress line with its ETA;
- :mod:`.runner`: runs the missing strategies, each in a child interpreter (``python -m JOB FOLDER NAME``)
  or a fork of this one;
- :mod:`.measure`: peak memory (RSS on CPU, CUDA max allocated on a GPU) and bytes on disk;
- :mod:`.report`: the Markdown table, the winner of each axis in words, the accuracy-vs-bytes plot,
  laid out the same way for every integration (:func:`.report.write_report`).

The integrations (:mod:`lorakit.yolo.comparison`, :mod:`lorakit.hf.comparison`) supply the
strategies' training and the columns.
"""
