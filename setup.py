from setuptools import find_packages, setup

setup(
    name="san_det",
    version="0.1.0",
    description="Self-attention backbones (SASA, SAN) for Detectron2",
    packages=find_packages(include=["san_det", "san_det.*"]),
    package_data={"san_det.layers": ["kernels/*.cu", "kernels/*.h"]},
    python_requires=">=3.9",
)
