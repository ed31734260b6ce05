"""s3mount: mount an S3 bucket as a local directory, plus bucket and object commands."""

__version__ = "0.1.0"
