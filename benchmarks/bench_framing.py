"""TLV codec throughput (issue 2): the decoder through its public next_event() API,
fed 64 KiB chunks of 200-byte-body and 16 KiB-body frames, and the two encoders.

Targets on the development machine: >= 1,000,000 frames/s on 200-byte bodies and
>= 3 GB/s on 16 KiB bodies. The "ceiling" row is a bare struct.unpack_from loop
over the same stream, with no chunking, checks or Frame objects. Best of 3 runs,
printed through benchmarks/harness with a verdict for each target.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.figures import Column, FigureTable, print_target, timings

from tlvproxy.framing import (
    NEED_DATA,
    Frame,
    FrameDecoder,
    RequestEncoder,
    default_layout,
    encode_frame,
)

if TYPE_CHECKING:
    from collections.abc import Callable

CHUNK = 64 * 1024
RUNS = 3
LAYOUT = default_layout()
TARGET_FRAMES = 1_000_000  # frames/s decoded, 200-byte bodies
TARGET_MB = 3_000  # MB/s decoded, 16 KiB bodies


def one_frame(body_size: int) -> Frame:
    return Frame(command=0x1001, seq=1, uid=42, flags=1, body=b"x" * body_size)


def stream_chunks(body_size: int) -> tuple[list[bytes], int]:
    """About 32 MiB of whole frames cut in 64 KiB chunks, and the frame count.

    It ends on a frame boundary, so feeding the chunks again continues the stream.
    """
    wire = encode_frame(LAYOUT, one_frame(body_size))
    count = max(1, 32 * 1024 * 1024 // len(wire))
    stream = wire * count
    return [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)], count


def decode_run(chunks: list[bytes], passes: int) -> int:
    decoder = FrameDecoder(LAYOUT)
    receive_data, next_event = decoder.receive_data, decoder.next_event
    frames = 0
    for _ in range(passes):
        for chunk in chunks:
            receive_data(chunk)
            while next_event() is not NEED_DATA:
                frames += 1
    return frames


def ceiling_run(chunks: list[bytes], passes: int) -> int:
    unpack_from = LAYOUT.header.unpack_from
    stream = b"".join(chunks)
    frames = 0
    for _ in range(passes):
        pos, end = 0, len(stream)
        while pos < end:
            length = unpack_from(stream, pos + 1)[5]
            body = stream[pos + 21 : pos + 21 + length]
            pos += 22 + len(body)
            frames += 1
    return frames


def best(run: Callable[[], int]) -> tuple[float, int]:
    """The shortest of RUNS timings, and what the run counted."""
    counts: list[int] = []
    seconds = timings(lambda: counts.append(run()), RUNS)
    return min(seconds), counts[-1]


def main() -> None:
    figures = FigureTable(
        "TLV codec throughput",
        "case (64 KiB chunks, best of 3)",
        34,
        [Column("frames/s", ",.0f", 14), Column("MB/s", ",.1f", 12)],
    )

    def row(name: str, seconds: float, frames: int, frame_size: int) -> float:
        """Prints the row; returns its frames/s."""
        rate = frames / seconds
        figures.row(name, rate, rate * frame_size / 1e6)
        return rate

    decoded: dict[int, float] = {}  # frames/s by body size
    for body_size, label, total_frames in ((200, "200 B", 1_000_000), (16384, "16 KiB", 40_000)):
        chunks, per_pass = stream_chunks(body_size)
        passes = max(1, total_frames // per_pass)
        frame_size = body_size + LAYOUT.frame_overhead
        seconds, frames = best(lambda: decode_run(chunks, passes))  # noqa: B023  # called at once
        assert frames == per_pass * passes, frames
        decoded[body_size] = row(f"decode {label} bodies", seconds, frames, frame_size)
        seconds, frames = best(lambda: ceiling_run(chunks, passes))  # noqa: B023  # called at once
        row("  ceiling: bare unpack_from loop", seconds, frames, frame_size)

    frame = one_frame(200)
    frame_size = 200 + LAYOUT.frame_overhead
    count = 1_000_000
    seconds, _ = best(lambda: sum(1 for _ in range(count) if encode_frame(LAYOUT, frame)))
    row("encode_frame 200 B bodies", seconds, count, frame_size)
    encode, body = RequestEncoder(LAYOUT).encode, frame.body
    seconds, _ = best(lambda: sum(1 for seq in range(count) if encode(0x1001, seq, 42, body)))
    row("RequestEncoder.encode 200 B bodies", seconds, count, frame_size)
    print_target("decode, 200 B bodies", decoded[200], ">=", TARGET_FRAMES, ",.0f", "/s")
    megabytes = decoded[16384] * (16384 + LAYOUT.frame_overhead) / 1e6
    print_target("decode, 16 KiB bodies", megabytes, ">=", TARGET_MB, ",.0f", " MB/s")


if __name__ == "__main__":
    main()
