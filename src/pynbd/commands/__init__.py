"""The ``pynbd`` commands' shared parts and the qemu-nbd compatible command.

``common`` holds what every server command uses at start-up; ``serve`` turns
``pynbd [options] IMAGE`` into a ``Config``; ``run`` opens the image, binds and
serves it.  The dispatcher is ``pynbd.cli``.
"""
