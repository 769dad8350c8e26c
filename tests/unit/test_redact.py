from driftloop.redact import mask_uri


def test_userinfo_and_secret_parameters_are_masked() -> None:
    assert mask_uri("s3://AKIAKEY:s3cr3t@bucket/data/x.parquet") == "s3://AKIAKEY:***@bucket/data/x.parquet"
    assert mask_uri("https://ghp_token@host/x.csv") == "https://***@host/x.csv"
    signed = mask_uri("https://b.s3.amazonaws.com/x.csv?X-Amz-Credential=AK%2F1&X-Amz-Signature=abc&versionId=7")
    assert "abc" not in signed and "AK" not in signed and "versionId=7" in signed
    assert mask_uri("https://acct.blob.core.windows.net/c/x.csv?sv=2024&sig=SECRET") == (
        "https://acct.blob.core.windows.net/c/x.csv?sv=2024&sig=***")


def test_plain_paths_and_clean_urls_are_unchanged() -> None:
    for uri in ("/data/x.csv", "data/x.csv", "s3://bucket/x.parquet", "demo:analysis", "sql-block:loans",
                "https://host/x.csv?page=2"):
        assert mask_uri(uri) == uri
