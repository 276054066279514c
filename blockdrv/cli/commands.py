"""The command table: every subcommand's module, usage line and summary.

``blockdrv --help`` and each subcommand's ``--help`` usage line are made
from this one table, so the two cannot disagree.  A command's module lives
in this package and has ``run(argv) -> int`` (and ``parser()`` for its
options, except ``io``, which parses qemu-io's getopt syntax itself).
"""

from __future__ import annotations

from blockdrv._startup import NamedTuple

PROG = "blockdrv"


class Command(NamedTuple):
    module: str
    usage: str              # the syntax after "blockdrv", as qemu-img --help prints it
    summary: str            # one line
    error_status: int = 1   # exit status of an error (compare: 1 means "different")


# In qemu-img --help's order (its commands, then ours).
COMMANDS: dict[str, Command] = {
    "check": Command(
        "check", "check [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-U] filename",
        "check an image for consistency, and repair it with -r"),
    "commit": Command(
        "commit", "commit [-q] [-f fmt] [-t cache] [-b base] [-d] [-p] filename",
        "write an image's data into its backing file, then empty it"),
    "compare": Command(
        "compare", "compare [-f fmt] [-F fmt] [-p] [-q] [-s] [-U] filename1 filename2",
        "tell whether two images read the same, and where they first differ", 2),
    "convert": Command(
        "convert", "convert [-m num_coroutines] [-W] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] "
        "[-T src_cache] [-O output_fmt] [-o options] [-S sparse_size] [-U] "
        "filename [filename2 [...]] output_filename",
        "copy one or more images into a new image, in any format, keeping holes"),
    "create": Command(
        "create", "create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] "
        "[-o options] filename [size]",
        "create a new image"),
    "info": Command(
        "info", "info [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename",
        "show an image's format, sizes and format-specific details"),
    "map": Command(
        "map", "map [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] "
        "[-U] filename",
        "dump an image's allocation map, with the file offsets of its data"),
    "measure": Command(
        "measure", "measure [--output=ofmt] [-O output_fmt] [-o options] "
        "[--size N | [-f fmt] [-U] filename]",
        "tell the file size a new image of a format needs"),
    "rebase": Command(
        "rebase", "rebase [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] "
        "[-b backing_file [-F backing_fmt]] [--ignore-id-mismatch] filename",
        "give an image another backing file, keeping (or, with -u, not) its content"),
    "resize": Command(
        "resize", "resize [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename "
        "[+ | -]size",
        "change an image's virtual size"),
    "snapshot": Command(
        "snapshot", "snapshot [-U] [-q] [-l] [-a snapshot] [-c snapshot] [-d snapshot] "
        "filename",
        "list an image's internal snapshots (-l; -a, -c and -d are not supported yet)"),
    "bench": Command(
        "bench", "bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] "
        "[-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] "
        "[-S step_size] [-t cache] [-w] [-U] filename",
        "time a run of read or write requests, as qemu-img bench"),
    "io": Command(
        "io", "io [-f fmt] [-r] [-t cache] [-d discard] [-U] -c command ... filename",
        "qemu-io: run read, write, discard, map... commands on an image"),
    "nbd": Command(
        "nbd", "nbd [-r] [-f fmt] [-x name] [-D text] [-k path] [-p port] [-b addr] [-t] "
        "[-e num] [-A] [--fork] [--pid-file file] [--cache mode] [-n] [--discard mode] "
        "[--detect-zeroes mode] [-U] [--object spec] [--tls-creds id] [-v] filename",
        "serve an image over the NBD protocol, as qemu-nbd does"),
    "compact": Command(
        "compact", "compact [-p] [-q] [-f fmt] [--dry-run] filename",
        "give a VHDX image's unused space back, offline (Optimize-VHD)"),
    "fuse": Command(
        "fuse", "fuse [-r] [-f fmt] [-U] filename mountpoint",
        "mount an image's disk over a regular file (FUSE), as qemu-storage-daemon"),
}

NOTES = """\
'-U' (force-share) only goes with read-only opens (convert: the sources).
'-m' runs that many requests concurrently (asyncio tasks; without it, one
at a time); the target is written in order unless '-W'.  '-u' (do not open
the backing file) is refused for vhdx, whose children need their parent.
A convert target that is one of its sources (or their backing files),
under any name, is refused before anything is written.
'size' accepts the suffixes k, M, G, T, P and E (powers of 1024).
'ofmt' is 'human' or 'json'.  Exit codes follow qemu-img (check: 0 clean,
2 corruptions, 3 leaks, 1 error, 63 no check support; compare: 0 identical,
1 different, 2 error)."""


def usage_text() -> str:
    """``blockdrv --help``."""
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} command [command options]",
             "QEMU's block layer in Python: a qemu-img-like disk image utility",
             "", "Commands:"]
    lines += [f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", "Command syntax:"]
    lines += [f"  {cmd.usage}" for cmd in COMMANDS.values()]
    lines += ["", NOTES, "",
              f"'{PROG} COMMAND --help' describes a command and each of its options."]
    return "\n".join(lines)
