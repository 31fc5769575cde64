"""Pipeline stages. Each module holds pure cores, one ``run_<stage>`` that does the IO,
and a ``main()`` used as the DVC stage command (``python -m tasks.<stage>``)."""
