import mailbox
from pathlib import Path

import pytest

from filterd.trainer.data import (
    DataError,
    Example,
    deduplicate,
    prepare,
    read_mail,
    read_sms,
    read_spamassassin,
    read_split,
    write_split,
)
from tests.conftest import SMS_FILE, SPAMASSASSIN


def test_sms_reader_splits_on_first_tab_only():
    examples = read_sms(SMS_FILE)
    assert len(examples) == 5574
    assert sum(e.label == "ham" for e in examples) == 4827
    assert sum(e.label == "spam" for e in examples) == 747
    assert examples[0].id == f"{SMS_FILE.resolve()}#1"


def test_sms_reader_keeps_quotes_and_tabs_in_text(tmp_path):
    f = tmp_path / "sms"
    f.write_text('ham\tsay "hi"\tthen go\nspam\tWIN "now"\n')
    a, b = read_sms(f)
    assert (a.label, a.text) == ("ham", 'say "hi" then go')  # the tab is whitespace-normalised
    assert (b.label, b.text, b.id) == ("spam", 'WIN "now"', f"{f.resolve()}#2")


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "no messages"), ("maybe\thello\n", "expected 'ham<TAB>text'"), ("ham hi\n", "TAB")],
)
def test_sms_reader_errors(tmp_path, content, message):
    f = tmp_path / "sms"
    f.write_text(content)
    with pytest.raises(DataError, match=message):
        read_sms(f)


def _sms_examples():
    return read_sms(SMS_FILE)


def test_split_is_deduplicated_balanced_stratified_and_leak_free():
    data = prepare(_sms_examples(), seed=7)
    texts = {name: {e.text for e in ex} for name, ex in data.splits()}
    assert not texts["train"] & texts["val"]
    assert not texts["train"] & texts["test"]
    assert not texts["val"] & texts["test"]
    counts = data.counts
    assert counts["read"] == 5574
    assert counts["duplicates_dropped"] > 400  # the SMS spam repeats itself a lot
    spam = counts["unique_per_class"]["spam"]
    assert 600 < spam < 700
    assert counts["used_per_class"] == {"ham": spam, "spam": spam}
    total = 2 * spam
    assert abs(len(data.train) - 0.7 * total) <= 2
    assert abs(len(data.val) - 0.1 * total) <= 2
    assert abs(len(data.test) - 0.2 * total) <= 2
    for _, ex in data.splits():
        share = sum(e.label == "spam" for e in ex) / len(ex)
        assert 0.45 < share < 0.55


def test_split_is_deterministic_per_seed():
    a = prepare(_sms_examples(), seed=1)
    b = prepare(_sms_examples(), seed=1)
    c = prepare(_sms_examples(), seed=2)
    assert [e.id for e in a.test] == [e.id for e in b.test]
    assert a.fingerprint() == b.fingerprint()
    assert [e.id for e in a.test] != [e.id for e in c.test]
    assert a.fingerprint() != c.fingerprint()


def test_no_balance_keeps_everything():
    data = prepare(_sms_examples(), seed=1, balance=False)
    assert data.counts["used_per_class"] == data.counts["unique_per_class"]
    assert data.counts["used_per_class"]["ham"] > 4000


def test_single_class_and_label_conflict_are_errors():
    ham = [Example(f"h{i}", "ham", f"text {i}") for i in range(10)]
    with pytest.raises(DataError, match="no spam messages"):
        prepare(ham, seed=0)
    with pytest.raises(DataError, match="labelled both ham and spam"):
        deduplicate([*ham, Example("s", "spam", "text 3")])


def test_split_file_round_trip(tmp_path):
    data = prepare(_sms_examples(), seed=3)
    write_split(data, tmp_path / "split.jsonl")
    rows = read_split(tmp_path / "split.jsonl")
    assert len(rows) == len(data.train) + len(data.val) + len(data.test)
    test = [e for e, split in rows if split == "test"]
    assert test == data.test  # same ids, labels and texts, re-read from the source


MSG = b"From: Alice <alice@example.org>\nSubject: lunch %d\n\nSee you at %d?\n"


def test_maildir_mbox_and_folder_readers(tmp_path):
    md = mailbox.Maildir(tmp_path / "Maildir", create=True)
    for i in range(3):
        md.add(MSG % (i, i))
    (tmp_path / "Maildir" / "new" / "x").write_bytes(MSG % (9, 9))
    box = mailbox.mbox(tmp_path / "spam.mbox")
    for i in range(4):
        box.add(MSG % (10 + i, i))
    box.flush()
    folder = tmp_path / "folder" / "sub"
    folder.mkdir(parents=True)
    (folder / "1.eml").write_bytes(MSG % (20, 20))
    (folder / ".hidden").write_bytes(b"not a message")

    from_maildir = read_mail(tmp_path / "Maildir", "ham")
    assert len(from_maildir) == 4
    assert all(e.label == "ham" and "Subject: lunch" in e.text for e in from_maildir)
    from_mbox = read_mail(tmp_path / "spam.mbox", "spam")
    assert [e.id for e in from_mbox] == [
        f"{(tmp_path / 'spam.mbox').resolve()}#{n}" for n in (1, 2, 3, 4)
    ]
    assert [e.text.splitlines()[0] for e in from_mbox] == [
        f"Subject: lunch {n}" for n in (10, 11, 12, 13)
    ]
    from_folder = read_mail(tmp_path / "folder", "ham")
    assert [Path(e.id).name for e in from_folder] == ["1.eml"]

    # mbox ids survive a split round trip
    data = prepare(from_maildir + from_mbox + from_folder * 0, seed=0, balance=False)
    write_split(data, tmp_path / "split.jsonl")
    again = {e.id: e.text for e, _ in read_split(tmp_path / "split.jsonl")}
    assert again == {e.id: e.text for _, ex in data.splits() for e in ex}


def test_mail_reader_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_mail(tmp_path / "absent", "ham")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no messages"):
        read_mail(tmp_path / "empty", "ham")
    unreadable = tmp_path / "dir-as-file"
    unreadable.mkdir()
    (unreadable / "msg").symlink_to(tmp_path / "missing-target")
    with pytest.raises(DataError):
        read_mail(unreadable, "ham")


def test_spamassassin_layout_labels_by_folder():
    examples = read_spamassassin(SPAMASSASSIN)
    assert len(examples) == 6046
    labels = {Path(e.id).parent.name: e.label for e in examples}
    assert labels == {
        "easy_ham": "ham",
        "easy_ham_2": "ham",
        "hard_ham": "ham",
        "spam": "spam",
        "spam_2": "spam",
    }
