"""stages/urls.py: credentials never leave a URL unredacted."""




from stages import urls


def test_credentials_are_split_from_an_http_uri_only():
    assert urls.split_credentials("https://ann:p%40ss@mlflow.example:5000/base") == (
        "https://mlflow.example:5000/base", "ann", "p@ss")
    assert urls.split_credentials("http://127.0.0.1:5000") == ("http://127.0.0.1:5000", None, None)
    assert urls.split_credentials("sqlite:///a/b.db") == ("sqlite:///a/b.db", None, None)
