"""Sharpness analysis: Hessian spectra per label region and loss landscapes."""
