"""Rasterises printable ASCII of DejaVu Sans into the glyph atlases vigil draws report text with,
so reports need no font library or system font at run time.

    python3 -m venv venv && venv/bin/pip install pillow
    venv/bin/python assets/make_glyphs.py /usr/share/fonts/truetype/dejavu assets

Made with Pillow 13.0.0 (FreeType) from Debian's fonts-dejavu-core 2.37; licence: assets/FONT-LICENSE.

Format (all integers u8 unless noted): b"VGF1", line height, ascent, then for each character
32..=126: advance, width, height, left offset (i8), top offset from the line's top (i8), and
width * height coverage bytes, row-major.
"""
import struct
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ATLASES = [("DejaVuSans.ttf", 13, "sans-13.vgf"), ("DejaVuSans-Bold.ttf", 16, "sans-bold-16.vgf")]


def atlas(font_path, size):
    font = ImageFont.truetype(str(font_path), size)
    ascent, descent = font.getmetrics()
    out = bytearray(b"VGF1")
    out += struct.pack("BB", ascent + descent, ascent)
    pad = size
    for code in range(32, 127):
        ch = chr(code)
        canvas = Image.new("L", (3 * size, ascent + descent + 2 * pad), 0)
        ImageDraw.Draw(canvas).text((pad, pad), ch, font=font, fill=255, anchor="la")
        advance = round(font.getlength(ch))
        box = canvas.getbbox()
        if box is None:  # space
            out += struct.pack("BBBbb", advance, 0, 0, 0, 0)
            continue
        left, top, right, bottom = box
        glyph = canvas.crop(box)
        out += struct.pack("BBBbb", advance, right - left, bottom - top, left - pad, top - pad)
        out += glyph.tobytes()
    return bytes(out)


def main():
    fonts, target = Path(sys.argv[1]), Path(sys.argv[2])
    for font_file, size, name in ATLASES:
        (target / name).write_bytes(atlas(fonts / font_file, size))


if __name__ == "__main__":
    main()
