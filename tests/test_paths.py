"""SPEC 2.2 on Windows: paths in the ini with backslashes and drive letters.

No Windows machine runs these tests, so they give config.py Windows path
rules instead: its module attribute `os` is replaced by a stand-in whose
`path` is `ntpath` (the module `os.path` is on Windows), whose working directory is C:\\Windows\\system32 (where a service starts) and whose
file system holds only the files a test names. The ini text itself is real
(BOM and CRLF, as Notepad writes it) and goes through the real parser.

"""

import ntpath
from types import SimpleNamespace

import pytest

from relay_lib.config import command_line
from relay_lib.config import settings as config

SYSTEM32 = "C:\\Windows\\system32"
INI = "C:\\relay\\smtprelay.ini"


class WindowsOs:
    """The parts of `os` that config.py uses, with Windows semantics. An
    attribute missing here fails the test loudly."""

    name = "nt"
    sep = "\\"

    def __init__(self, cwd, files):
        self._cwd = cwd
        self.environ = {}
        self.path = SimpleNamespace(**{n: getattr(ntpath, n) for n in ntpath.__all__})
        # ntpath.abspath would use this machine's working directory.
        self.path.abspath = lambda p: ntpath.normpath(ntpath.join(self._cwd, p))
        known = {ntpath.normcase(f) for f in files}
        self.path.isfile = lambda p: ntpath.normcase(p) in known
        self.path.isdir = lambda p: True  # every folder exists; only files are listed

    def getcwd(self):
        return self._cwd


@pytest.fixture
def windows(monkeypatch, tmp_path):
    """windows(ini_text, files=(), config_path=INI, cwd=SYSTEM32, flags=None) -> Settings."""
    real_read_file = config.read_file

    def load(ini_text, files=(), config_path=INI, cwd=SYSTEM32, flags=None):
        fake = WindowsOs(cwd, files)
        monkeypatch.setattr(config, "os", fake)
        monkeypatch.setattr(command_line, "os", fake)
        ini = tmp_path / "smtprelay.ini"
        ini.write_bytes(b"\xef\xbb\xbf" + ini_text.replace("\n", "\r\n").encode("utf-8"))
        opened = []

        def read_file(path):
            opened.append(path)
            return real_read_file(str(ini))

        monkeypatch.setattr(config, "read_file", read_file)
        settings = config.load(config_path, flags, environ={})
        assert opened == [ntpath.join(ntpath.dirname(settings.config_path), ntpath.basename(config_path))]
        return settings

    return load


@pytest.mark.parametrize("value,expected", [
    ("relay.log", "C:\\relay\\relay.log"),
    ("logs\\relay.log", "C:\\relay\\logs\\relay.log"),
    ("logs/relay.log", "C:\\relay\\logs\\relay.log"),
    (".\\logs\\.\\relay.log", "C:\\relay\\logs\\relay.log"),
    ("..\\shared\\relay.log", "C:\\shared\\relay.log"),
    ("D:\\logs\\relay.log", "D:\\logs\\relay.log"),
    ("d:/logs/relay.log", "d:\\logs\\relay.log"),
    ("\\logs\\relay.log", "C:\\logs\\relay.log"),
    ("\\\\fileserver\\logs\\relay.log", "\\\\fileserver\\logs\\relay.log"),
    ('"C:\\Program Files\\smtprelay\\relay.log"', "C:\\Program Files\\smtprelay\\relay.log"),
    ("C:\\Program Files\\smtprelay\\relay.log  # comment", "C:\\Program Files\\smtprelay\\relay.log"),
], ids=["bare", "backslash", "forward-slash", "dots", "parent", "other-drive", "lower-drive-slashes",
        "rooted-takes-ini-drive", "unc", "quoted-spaces", "spaces-and-comment"])
def test_2_2_windows_logfile_resolves_against_ini_folder(windows, value, expected):
    settings = windows("logfile = %s\n" % value)
    assert settings.base_dir == "C:\\relay"
    assert settings.logfile == expected


def test_2_2_windows_relative_config_path_uses_working_directory(windows):
    settings = windows("logfile = relay.log\n", config_path="conf\\smtprelay.ini", cwd="D:\\smtprelay")
    assert settings.config_path == "D:\\smtprelay\\conf\\smtprelay.ini"
    assert settings.logfile == "D:\\smtprelay\\conf\\relay.log"


def test_2_2_windows_files_checked_at_their_resolved_path(windows):
    settings = windows("aliases_file = aliases.txt\n", files=["C:\\RELAY\\Aliases.txt"])
    assert settings.aliases_file == "C:\\relay\\aliases.txt"  # found: Windows names ignore case
    with pytest.raises(config.ConfigError) as err:
        windows("aliases_file = aliases.txt\n", files=["C:\\Windows\\system32\\aliases.txt"])
    assert err.value.option == "aliases_file"
    assert "C:\\relay\\aliases.txt" in str(err.value)  # never the service's working directory


def test_2_2_windows_flags_and_environment_resolve_against_ini_folder(windows):
    settings = windows("logfile = ignored.log\n", flags={"logfile": "override.log"})
    assert settings.logfile == "C:\\relay\\override.log"


@pytest.mark.parametrize("url,expected", [
    ("file:outbox", "C:\\relay\\outbox"),
    ("file:mail\\outbox", "C:\\relay\\mail\\outbox"),
    ("file:D:\\mail\\outbox", "D:\\mail\\outbox"),
    ("file:D:/mail/outbox", "D:\\mail\\outbox"),
    ("file:\\\\fileserver\\mail", "\\\\fileserver\\mail"),
], ids=["bare", "backslash", "drive", "drive-slashes", "unc"])
def test_5_1_windows_file_remote_resolves_against_ini_folder(windows, url, expected):
    settings = windows("remotes = %s\n" % url)
    assert [r.path for r in settings.remotes] == [expected]


def test_2_2_windows_drive_relative_path_is_an_error(windows):
    with pytest.raises(config.ConfigError) as info:
        windows("logfile = D:relay.log\n")
    assert info.value.option == "logfile" and "D:\\relay.log" in info.value.reason


def test_5_1_windows_file_remote_beside_smtp_remote(windows):
    settings = windows("remotes = file:C:\\mail\\copy smtp://smtp.example.com:25\n")
    assert settings.remotes[0].path == "C:\\mail\\copy"
    assert (settings.remotes[1].host, settings.remotes[1].port) == ("smtp.example.com", 25)


def test_5_1_windows_file_url_with_three_slashes(windows):
    settings = windows("remotes = file:///D:/mail/outbox\n")
    assert settings.remotes[0].path == "D:\\mail\\outbox"


def test_5_1_windows_file_remote_with_space_percent_encoded(windows):
    settings = windows("remotes = file:C:/Program%20Files/smtprelay/outbox\n")
    assert settings.remotes[0].path == "C:\\Program Files\\smtprelay\\outbox"


def test_4_3_windows_command_without_quotes(windows):
    settings = windows("command = C:\\tools\\scan.exe --mode relay\n")
    assert settings.command == ("C:\\tools\\scan.exe", "--mode", "relay")


def test_4_3_windows_command_quoted_path_with_spaces(windows):
    settings = windows('command = "C:\\Program Files\\Scanner\\scan.exe" --out "D:\\spool dir" -v\n')
    assert settings.command == ("C:\\Program Files\\Scanner\\scan.exe", "--out", "D:\\spool dir", "-v")


def test_2_2_value_in_quotes_loses_one_pair_of_quotes(windows):
    """SPEC 2.2 removes one pair of surrounding quotes, so a command that
    starts and ends with a quoted word needs one more pair around it."""
    settings = windows('command = ""C:\\tools\\scan.exe" "D:\\spool dir""\n')
    assert len(settings.command) == 2
    assert settings.command[0].strip('"') == "C:\\tools\\scan.exe"
