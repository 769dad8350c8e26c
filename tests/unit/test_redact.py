import pytest
from pydantic import BaseModel, SecretStr

from driftloop.errors import CredentialsInUri
from driftloop.redact import credentials_in, mask_uri, refuse_credentials, refuse_credentials_in
from driftloop.registry.urls import masked_url

# An AWS-style secret key holding '/', and secrets holding '#' and '?': each ended the
# RFC authority early, and the whole secret came back unmasked.
SLASH = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY"


def test_userinfo_and_secret_parameters_are_masked() -> None:
    assert mask_uri("s3://AKIAKEY:s3cr3t@bucket/data/x.parquet") == "s3://AKIAKEY:***@bucket/data/x.parquet"
    assert mask_uri("https://ghp_token@host/x.csv") == "https://***@host/x.csv"
    signed = mask_uri("https://b.s3.amazonaws.com/x.csv?X-Amz-Credential=AK%2F1&X-Amz-Signature=abc&versionId=7")
    assert "abc" not in signed and "AK" not in signed and "versionId=7" in signed
    assert mask_uri("https://acct.blob.core.windows.net/c/x.csv?sv=2024&sig=SECRET") == (
        "https://acct.blob.core.windows.net/c/x.csv?sv=2024&sig=***")


@pytest.mark.parametrize("secret", [SLASH, "ab#cd/ef", "ab?cd", "ab@cd/ef", "/leading", "12345/abc"])
def test_secrets_holding_slash_hash_question_mark_or_at_are_masked(secret: str) -> None:
    uri = f"s3://AKIAKEY:{secret}@bucket/data/x.parquet"
    shown = mask_uri(uri)
    assert shown == "s3://AKIAKEY:***@bucket/data/x.parquet"
    assert credentials_in(uri) == ["a password in its user part"]


def test_http_secret_with_slash_is_masked_but_a_port_and_an_at_in_the_path_are_not_credentials() -> None:
    assert mask_uri("https://user:pa/ss@host/x.csv") == "https://user:***@host/x.csv"
    for clean in ("https://host:8443/files/a@b.csv", "s3://bucket/people/ann@example.com/x.csv",
                  "file:///home/ann@example.com/x.csv", "http://[::1]:8080/a@b.csv"):
        assert credentials_in(clean) == [] and mask_uri(clean) == clean


def test_a_secret_parameter_holding_hash_masks_the_fragment_too() -> None:
    shown = mask_uri("https://host/x.csv?sig=abc#def&v=1")
    assert "abc" not in shown and "def" not in shown


def test_plain_paths_and_clean_urls_are_unchanged() -> None:
    for uri in ("/data/x.csv", "data/x.csv", "s3://bucket/x.parquet", "demo:analysis", "sql-block:loans",
                "https://host/x.csv?page=2", "car_loan@champion", "tcp://10.0.0.1:8786",
                "postgresql+psycopg://scorer@db.example/loans", "sftp://ann@host/x.csv"):
        assert mask_uri(uri) == uri
        assert credentials_in(uri) == []
        assert refuse_credentials(uri) == uri


def test_masked_url_hides_query_passwords_and_never_returns_a_non_url_whole() -> None:
    shown = masked_url("postgresql+psycopg://scorer@db.example/loans?password=hunter2&sslmode=require")
    assert "hunter2" not in shown and "sslmode=require" in shown
    assert "hunter2" not in masked_url("postgresql+psycopg://scorer:hunter2@db.example/loans")
    assert "hunter2" not in masked_url("postgresql+psycopg://scorer:hun@ter2@db.example/loans")
    # a libpq keyword string, or a typo: not a URL, so nothing of it is shown
    assert "hunter2" not in masked_url("host=db.example user=scorer password=hunter2")
    assert "hunter2" not in masked_url("hunter2")


@pytest.mark.parametrize("uri", [
    f"s3://AKIAKEY:{SLASH}@bucket/x.parquet", "https://ghp_token@host/x.csv",
    "https://b.s3.amazonaws.com/x.csv?X-Amz-Signature=abc", "postgresql://scorer:hunter2@db/loans",
    "https://host/x.csv?password=hunter2",
])
def test_a_uri_with_credentials_is_refused_naming_the_safe_ways_and_not_the_secret(uri: str) -> None:
    with pytest.raises(CredentialsInUri) as err:
        refuse_credentials(uri, "--input")
    message = str(err.value)
    assert message.startswith("--input ") and "environment" in message and "Prefect Secret" in message
    for secret in (SLASH, "ghp_token", "abc", "hunter2"):
        assert secret not in message


def test_parameters_are_searched_in_nested_models_lists_and_secret_strings() -> None:
    class Sql(BaseModel):
        url: SecretStr | None = None
        table: str = "loans"

    refuse_credentials_in({"input_uri": "s3://bucket/x", "sql": Sql(url=SecretStr("sqlite:///x.db")), "n": 3})
    with pytest.raises(CredentialsInUri, match=r"parameter sql\.url: postgresql://u:\*\*\*@db/x holds"):
        refuse_credentials_in({"sql": Sql(url=SecretStr("postgresql://u:hunter2@db/x"))})
    with pytest.raises(CredentialsInUri, match=r"parameter inputs\[1\]"):
        refuse_credentials_in({"inputs": ["s3://b/x", "https://tok@h/x"]})
