"""fruits.core.spark.lighten_worker_imports, in a fresh interpreter (it changes sys.path)."""

import subprocess
import sys
import textwrap
import zipfile


def test_jars_and_package_zip_importers_leave_the_path_and_imports_still_work(tmp_path):
    with zipfile.ZipFile(tmp_path / "lib.zip", "w") as archive:
        archive.writestr("zpkg/__init__.py", "")
        archive.writestr("zpkg/first.py", "VALUE = 1")
        archive.writestr("zpkg/later.py", "VALUE = 2")
    with zipfile.ZipFile(tmp_path / "core.jar", "w") as archive:
        archive.writestr("jarmod.py", "VALUE = 3")
    script = textwrap.dedent(f"""
        import importlib, sys, zipimport
        sys.path[1:1] = [{str(tmp_path / "lib.zip")!r}, {str(tmp_path / "core.jar")!r}]
        import zpkg.first, jarmod
        zips = lambda: sorted(key for key, finder in sys.path_importer_cache.items()
                              if isinstance(finder, zipimport.zipimporter))
        before = zips()
        from fruits.core.spark import lighten_worker_imports
        lighten_worker_imports()
        after = zips()
        importlib.invalidate_caches()  # what Spark's worker does before each task
        import zpkg.later  # a module not imported yet, from the package whose importer left the cache
        print(before)
        print(after)
        print([entry for entry in sys.path if entry.endswith((".jar", ".zip")) and {str(tmp_path)!r} in entry])
        print(zpkg.first.VALUE + zpkg.later.VALUE)
    """)
    lines = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    before, after, on_path, total = (eval(line) for line in lines)
    lib, jar = str(tmp_path / "lib.zip"), str(tmp_path / "core.jar")
    assert {lib, f"{lib}/zpkg", jar} <= set(before)  # the jar and the package each had an importer
    assert jar not in after and f"{lib}/zpkg" not in after and lib in after
    assert on_path == [lib]
    assert total == 3
