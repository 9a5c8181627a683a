"""Raw file readers: every record comes out, parsed or with why it could not be."""

from __future__ import annotations

import pandas as pd
import pytest

from app.errors import DataContractError
from data.readers import ERROR, ROW, SOURCE, TEXT, read_csv, read_jsonl

COLUMNS = ["id", "amount", "email"]


def frame(blocks) -> pd.DataFrame:  # noqa: ANN001
    return pd.concat(list(blocks), ignore_index=True).sort_values(ROW, ignore_index=True)


def test_csv_keeps_bad_lines_with_their_line_number_and_redacted_text() -> None:
    data = (
        b"id,amount,email\n"
        b"1,2.5,a@b.io\n"
        b"2,oops;x@y.io\n"  # one field short
        b"\xff\xfe,3,c@d.io\n"  # not UTF-8
        b"\n"  # an empty line: a record of nulls, for the contract to refuse
        b"4,abc,e@f.io\n"  # a word for a number: the contract's business, not the parser's
        b"5,1"  # cut off
    )
    out = frame(read_csv(data, "s3://bucket/raw.csv", COLUMNS))
    assert out[ROW].tolist() == [2, 3, 4, 5, 6, 7]
    assert (out[SOURCE] == "s3://bucket/raw.csv").all()
    assert out[ERROR].isna().tolist() == [True, False, False, True, True, False]
    assert out.loc[out[ROW] == 3, TEXT].item() == "2,oops;[EMAIL]"  # no PII in the quarantine
    assert "not UTF-8" in out.loc[out[ROW] == 4, ERROR].item()
    assert "expected 3 fields" in out.loc[out[ROW] == 7, ERROR].item()
    assert out.loc[out[ROW] == 6, "amount"].item() == "abc"
    assert out.loc[out[ROW] == 5, COLUMNS].isna().all(axis=None)


def test_csv_with_a_wrong_header_names_the_file_and_columns() -> None:
    with pytest.raises(DataContractError, match=r"x\.csv: missing column 'email'; unexpected"):
        list(read_csv(b"id,amount,mail\n1,2,a@b.io\n", "x.csv", COLUMNS))


def test_jsonl_keeps_bad_lines_and_records_with_wrong_fields() -> None:
    data = (
        b'{"id": 1, "amount": 2.5, "email": "a@b.io"}\n'
        b'{"id": 2, "amount": 2.5\n'
        b'{"id": 3, "amount": 1, "email": "c@d.io", "extra": 1}\n'
        b"[1, 2, 3]\n"
        b'{"id": 5, "amount": "abc", "email": "\xff"}\n'
    )
    out = frame(read_jsonl(data, "raw.jsonl", COLUMNS))
    assert out[ROW].tolist() == [1, 2, 3, 4, 5]
    assert out[ERROR].tolist()[1:] == [
        "unparseable: not valid JSON",
        "record: unexpected field 'extra'",
        "unparseable: not a JSON object",
        "unparseable: not UTF-8 text",
    ]
    assert "[EMAIL]" in out.loc[out[ROW] == 3, TEXT].item()
    assert out.loc[0, COLUMNS].tolist() == [1, 2.5, "a@b.io"]


def test_csv_from_excel_and_windows_bom_and_crlf() -> None:
    data = b"\xef\xbb\xbfid,amount,email\r\n1,2.5,a@b.io\r\n2,3,c@d.io\r\n"
    out = frame(read_csv(data, "x.csv", COLUMNS))
    assert out[ROW].tolist() == [2, 3] and out[ERROR].isna().all()
    assert out["email"].tolist() == ["a@b.io", "c@d.io"]  # no stray \r


def test_a_header_only_csv_holds_no_records() -> None:
    assert list(read_csv(b"id,amount,email", "x.csv", COLUMNS)) == []
    assert list(read_csv(b"id,amount,email\n", "x.csv", COLUMNS)) == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"id,amount,email,email\n1,2,a@b.io,a@b.io\n", "repeated column 'email'"),
        (b"id,amount,email\r1,2,a@b.io\r", "not a readable CSV header"),
        (b"\xff\xfeid,amount\n", "not a readable CSV header"),
    ],
)
def test_a_csv_whose_header_cannot_be_used_is_refused_by_name(data: bytes, message: str) -> None:
    with pytest.raises(DataContractError, match=rf"x\.csv: .*{message}"):
        list(read_csv(data, "x.csv", COLUMNS))


def test_jsonl_with_a_bom_and_an_escaped_lone_surrogate() -> None:
    data = (
        b'\xef\xbb\xbf{"id": 1, "amount": 2.5, "email": "a@b.io"}\n'
        b'{"id": 2, "amount": 2.5, "email": "\\ud800@b.io"}\n'
    )
    out = frame(read_jsonl(data, "raw.jsonl", COLUMNS))
    assert pd.isna(out.loc[0, ERROR]) and out.loc[0, "id"] == 1  # the BOM is not a field
    assert out.loc[1, ERROR] == "unparseable: not UTF-8 text"


def test_a_cut_line_loses_even_partial_pii() -> None:
    data = b'{"id": 1, "amount": 2.5, "email": "kofi.silva52@exam\n{"id": 2, "card": "4816792982'
    out = frame(read_jsonl(data, "raw.jsonl", COLUMNS))
    text = " ".join(out[TEXT])
    assert "kofi" not in text and "4816792982" not in text
    assert "[EMAIL]" in text and "[NUMBER]" in text


def test_a_parquet_file_damaged_inside_is_refused_by_name(tmp_path) -> None:  # noqa: ANN001
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from data.readers import read_parquet

    path = tmp_path / "x.parquet"
    table = pa.table({"id": list(range(5000)), "amount": [1.5] * 5000, "email": ["a@b.io"] * 5000})
    pq.write_table(table, path, compression="snappy", use_dictionary=False)
    raw = bytearray(path.read_bytes())
    raw[200:1200] = b"\x00" * 1000  # the first data page, the footer intact
    path.write_bytes(bytes(raw))
    with pafs.LocalFileSystem().open_input_file(str(path)) as f:
        with pytest.raises(DataContractError, match=r"x\.parquet is damaged"):
            list(read_parquet(f, str(path), COLUMNS))


# A card and an email where a name should be: neither may reach an error or a reason.
HOSTILE = ("4111111111111111", "jane.doe@example.com")


def test_a_csv_without_a_header_is_refused_without_echoing_its_first_record() -> None:
    data = f"1,25.00,{HOSTILE[1]}\n2,{HOSTILE[0]},x@y.io\n".encode()
    with pytest.raises(DataContractError) as err:
        list(read_csv(data, "x.csv", COLUMNS))
    message = str(err.value)
    assert "x.csv: the first line has none of the contract's columns" in message
    assert "header row id,amount,email" in message  # what to add
    assert not any(h in message for h in HOSTILE) and "25.00" not in message


def test_names_that_could_be_pii_are_counted_not_shown() -> None:
    header = f"id,amount,email,{HOSTILE[0]},{HOSTILE[1]},note\n".encode()
    with pytest.raises(DataContractError) as err:
        list(read_csv(header, "x.csv", COLUMNS))
    message = str(err.value)
    assert "unexpected column 'note'" in message  # a name-like column is still named
    assert message.count("characters, not shown") == 2
    assert not any(h in message for h in HOSTILE)
    line = '{"id": 1, "amount": 2, "email": "a@b.io", "%s": 1}\n'
    data = "".join(line % h for h in HOSTILE).encode()
    out = frame(read_jsonl(data, "raw.jsonl", COLUMNS))
    assert out[ERROR].tolist() == [
        "record: unexpected field (16 characters, not shown)",
        "record: unexpected field (20 characters, not shown)",
    ]
    assert not any(h in text for h in HOSTILE for text in out[TEXT])


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_a_file_read_in_pieces_gives_every_record_once_with_its_number(
    tmp_path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:  # noqa: ANN001
    """A large file is cut into pieces that run as separate read tasks: together they
    give exactly the records of one read of the whole file, with the same record
    numbers, errors and redacted texts, bad lines, a BOM and a cut-off last line
    included."""
    import pyarrow.parquet as pq

    from app.workloads import get_workload
    from data import sources
    from data.generate import generate_transactions
    from data.readers import read_piece
    from data.sources import describe_file, local_source

    workload = get_workload("transactions")
    columns = list(workload.contract().columns)
    faults = ("nulls", "malformed") if fmt != "parquet" else ("nulls",)
    report = generate_transactions(tmp_path / "raw", rows=400, seed=3, fault_rate=0.1,
                                   faults=faults, fmt=fmt)  # fmt: skip
    path = report.files[0]
    if fmt == "parquet":  # row groups of 30 rows, so that there is something to cut
        pq.write_table(pq.read_table(path), path, row_group_size=30)
    else:
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes() + b'99,"cut off')
    source = local_source(path)

    def read(**cut: int) -> tuple[int, pd.DataFrame, int]:
        for name, value in cut.items():
            monkeypatch.setattr(sources, name, value)
        described = describe_file(source, source.paths[0], workload)
        blocks = [b for p in described.pieces for b in read_piece(source.filesystem, p, columns)]
        return len(described.pieces), frame(blocks), described.records

    one, whole, records = read()
    many, pieced, _ = read(PIECE_BYTES=2000, PIECE_ROWS=50)
    assert one == 1 and many > 4
    assert len(whole) == records
    pd.testing.assert_frame_equal(pieced, whole)
    if fmt != "parquet":
        assert whole[ERROR].notna().sum() > 3  # bad lines were among the cut ones


def test_a_quoted_line_break_right_at_a_cut_is_refused_like_one_inside_a_piece(tmp_path) -> None:  # noqa: ANN001
    """A cut right after a line that opens a quoted value would leave both pieces
    parsing cleanly (``"a`` and ``b"``), two halves of one record. The file is refused
    instead, as a quoted line break inside a piece is."""
    import pyarrow.fs as pafs

    from data.readers import Piece, read_piece

    head, tail = b'id,amount,email\n1,2,a@b.io\n3,"4\n', b'5",c@d.io\n6,7,e@f.io\n'
    path = tmp_path / "x.csv"
    path.write_bytes(head + tail)
    fs = pafs.LocalFileSystem()
    with pytest.raises(DataContractError, match=r"x\.csv: quoted values with line breaks"):
        list(read_piece(fs, Piece(str(path), 0, len(head), 2), COLUMNS))
    with pytest.raises(DataContractError, match=r"x\.csv: .*quoted values with line breaks"):
        list(read_piece(fs, Piece(str(path), 0, len(head + tail), 2), COLUMNS))
    fine = b'id,amount,email\n1,"2,5",a@b.io\n3,4,"c""d@e.io"\n'  # quotes closed at the cut
    path.write_bytes(fine + b"6,7,e@f.io\n")
    assert len(frame(read_piece(fs, Piece(str(path), 0, len(fine), 2), COLUMNS))) == 2
