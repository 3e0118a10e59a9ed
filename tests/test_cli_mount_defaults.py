"""The configuration's [mount] section: defaults for `privifs mount` options, the command line
winning; a name or value the option would refuse is a one-line error (such values were
ignored without a word: nothing read the section)."""

from __future__ import annotations

import pytest

from privifs.cli import build_parser, main
from privifs.cli.mount_cmd import config_defaults
from privifs.errors import ConfigError


def parse(*argv: str):
    return build_parser().parse_args(["mount", "/mnt/vault", *argv])


def test_mount_options_default_to_the_configuration_and_the_command_line_wins(tmp_path):
    args = parse("--upload-workers", "4")
    section = {"cache_size": "5G", "fsync": "local", "allow_other": True, "upload_workers": 9, "refresh-interval": 2}
    config_defaults(args, section, tmp_path / "config.toml")
    assert args.cache_size == 5 * 2**30
    assert args.fsync_mode == "local" and args.allow_other is True and args.refresh_interval == 2.0
    assert args.upload_workers == 4


@pytest.mark.parametrize(
    ("section", "says"),
    [
        ({"cache_size": "zz"}, "[mount] cache_size = 'zz'"),
        ({"upload_workers": -3}, "[mount] upload_workers = -3"),
        ({"fsync": "disk"}, "must be one of vault, local"),
        ({"allow_other": "yes"}, "must be true or false"),
        ({"cache_sise": "1G"}, "has no setting 'cache_sise'"),
        ({"write_back_delay": [1]}, "must be a string or a number"),
    ],
)
def test_a_bad_mount_setting_in_the_configuration_is_named_in_a_clear_error(tmp_path, section, says):
    with pytest.raises(ConfigError) as info:
        config_defaults(parse(), section, tmp_path / "config.toml")
    assert says in str(info.value), info.value


def test_privifs_mount_with_a_bad_setting_says_so_in_one_line_and_mounts_nothing(tmp_path, capsys):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[server]\nembedded = true\n\n[account]\nusername = "u@localhost"\n\n[mount]\ncache_size = "zz"\n')
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    code = main(["--config", str(cfg), "mount", str(mnt)])
    err = capsys.readouterr().err
    assert code == 3 and err.count("\n") == 1 and "[mount] cache_size" in err, err
    assert not any(mnt.iterdir())


def test_an_option_given_at_its_default_value_still_beats_the_configuration(tmp_path):
    args = parse("--fsync", "vault", "--upload-workers", "32", "--cache-size", "2G")
    config_defaults(args, {"fsync": "local", "upload_workers": 4, "cache_size": "1G"}, tmp_path / "config.toml")
    assert args.fsync_mode == "vault" and args.upload_workers == 32 and args.cache_size == 2 * 2**30


def test_options_neither_given_nor_configured_take_their_defaults(tmp_path):
    args = parse()
    config_defaults(args, {}, tmp_path / "config.toml")
    assert args.fsync_mode == "vault" and args.upload_workers == 32 and args.allow_other is False
    assert args.cache_size == 2 * 2**30 and args.write_back_delay == 1.0 and args.cache_dir is None
