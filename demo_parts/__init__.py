"""The demo's parts (``demo.py`` is the script that runs them in order).

* :mod:`demo_parts.plan`    - where everything goes (:class:`DemoPaths`), the demo's sizes
  (:class:`DemoSettings`) and each step's command line (the same CLIs users and cluster jobs run);
* :mod:`demo_parts.runner`  - running a step as a child process, its output in ``WORK/logs/<step>.log``;
* :mod:`demo_parts.console` - the ``[demo]`` lines and the progress bars (tqdm) the console shows,
  read from the jobs' own progress lines;
* :mod:`demo_parts.results` - checks and one-line summaries of what the steps left on disk;
* :mod:`demo_parts.request` - the demo's request (portrait and a new sentence) and its video's scores.

A room of the job layer, beside ``training`` and ``serve`` (tests/test_layering.py): it imports
``core``, ``pipelines``, ``models`` and ``inference``, never ``training`` or ``serve`` (the demo
script itself reads MLflow through :mod:`training.run_summary` and talks to the service through
:class:`serve.client.VideoClient`).
"""
