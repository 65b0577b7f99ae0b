"""Train a captioner. ``python train.py`` fits on the built-in shapes set (configs/shapes.yaml);
``python train.py fit -c configs/<name>.yaml`` for another recipe; ``--help`` lists every option."""

from captioning.cli import main

if __name__ == "__main__":
    main()
